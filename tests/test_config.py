"""ServerConfig: flags, RAGSERVE_* variables, SageMaker's port, errors that name the flag; the
`ragserve` subcommands that take those flags."""

import argparse
from pathlib import Path

import pytest

from server.config import ConfigError, ServerConfig, config_from_args, env_name


def test_defaults_serve_the_embedded_model_on_localhost():
    cfg = config_from_args([], environ={})
    assert (cfg.model, cfg.host, cfg.port) == (None, "127.0.0.1", 8000)
    assert cfg.engine_config().model is None


def test_flags_named_as_vllm_names_them():
    cfg = config_from_args(
        ["--model", "/m", "--served-model-name", "m", "--max-model-len", "512",
         "--max-num-seqs", "8", "--dtype", "float32", "--api-key", "k",
         "--context-encoding-buckets", "128,256", "--token-generation-buckets", "256,512",
         "--max-queue-len", "3", "--device", "cpu"], environ={})
    assert cfg.served_model_name == "m"
    assert cfg.context_encoding_buckets == (128, 256)
    ec = cfg.engine_config()
    assert (ec.model, ec.max_model_len, ec.max_num_seqs, ec.dtype) == ("/m", 512, 8, "float32")
    assert ec.token_generation_buckets == (256, 512)
    assert ec.max_num_batched_tokens == 2048  # vLLM's default on CPU
    ec = config_from_args(["--max-num-batched-tokens", "512"], environ={}).engine_config()
    assert ec.max_num_batched_tokens == 512


def test_every_flag_reads_its_environment_variable_and_flags_win():
    env = {"RAGSERVE_PORT": "9001", "RAGSERVE_MAX_NUM_SEQS": "3", "RAGSERVE_API_KEY": "s",
           "RAGSERVE_COMPILE": "true", "RAGSERVE_CONTEXT_ENCODING_BUCKETS": "64,128"}
    cfg = config_from_args([], environ=env)
    assert (cfg.port, cfg.max_num_seqs, cfg.api_key, cfg.compile) == (9001, 3, "s", True)
    assert cfg.context_encoding_buckets == (64, 128)
    assert config_from_args(["--port", "9002"], environ=env).port == 9002
    assert env_name("--max-model-len") == "RAGSERVE_MAX_MODEL_LEN"


def test_sagemaker_port():
    assert config_from_args([], environ={"SAGEMAKER_BIND_TO_PORT": "8080"}).port == 8080
    assert config_from_args(["--port", "7"], environ={"SAGEMAKER_BIND_TO_PORT": "8080"}).port == 7


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--max-num-seqs", "0"], {}, "--max-num-seqs must be >= 1, got 0"),
    (["--max-num-batched-tokens", "0"], {}, "--max-num-batched-tokens must be >= 1, got 0"),
    (["--compile", "--max-num-batched-tokens", "512"], {},
     "--max-num-batched-tokens bounds ragserve's mixed prefill/decode steps"),
    ([], {"RAGSERVE_MAX_NUM_SEQS": "0"},
     r"--max-num-seqs must be >= 1, got 0 \(from RAGSERVE_MAX_NUM_SEQS\)"),
    ([], {"RAGSERVE_PORT": "http"}, "RAGSERVE_PORT \\(for --port\\)"),
    (["--tensor-parallel-size", "2"], {}, "--tensor-parallel-size is 2, but ragserve's engine "
                                          "shards a model only with --device neuron"),
    (["--engine", "tgi"], {}, "argument --engine: invalid choice"),
    ([], {"RAGSERVE_ENGINE": "tgi"}, r"RAGSERVE_ENGINE \(for --engine\) must be one of"),
    (["--vllm-arg", "enable_prefix_caching=true"], {}, "--vllm-arg applies to --engine vllm"),
    (["--engine", "vllm", "--vllm-arg", "novalue"], {}, "expected KEY=VALUE"),
    ([], {"RAGSERVE_ENGINE": "vllm", "RAGSERVE_VLLM_ARG": "a=1 =2"},
     r"RAGSERVE_VLLM_ARG \(for --vllm-arg\): expected KEY=VALUE, got '=2'"),
    (["--engine", "vllm", "--compile"], {}, "--compile applies to --engine ragserve only"),
    (["--engine", "vllm", "--context-encoding-buckets", "128,256"], {},
     "--context-encoding-buckets means nothing to vLLM on --device cpu"),
    (["--engine", "vllm", "--device", "cuda", "--token-generation-buckets", "128"], {},
     "--token-generation-buckets means nothing to vLLM on --device cuda"),
    ([], {"RAGSERVE_DEVICE": "tpu"}, "RAGSERVE_DEVICE \\(for --device\\) must be one of"),
    (["--port", "70000"], {}, "--port must be in 1..65535"),
    (["--timeout-keep-alive", "0"], {}, "--timeout-keep-alive must be > 0 seconds, got 0.0"),
    ([], {"RAGSERVE_CONTEXT_ENCODING_BUCKETS": "a,b"}, "RAGSERVE_CONTEXT_ENCODING_BUCKETS"),
])
def test_errors_name_the_flag(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(argv, environ=env)


def test_engine_flags_from_the_command_line_and_the_environment():
    cfg = config_from_args(["--engine", "vllm", "--tensor-parallel-size", "2", "--device",
                            "cuda", "--vllm-arg", "enable-prefix-caching=true",
                            "--vllm-arg", "distributed_executor_backend=ray"], environ={})
    assert cfg.engine == "vllm" and cfg.tensor_parallel_size == 2
    assert cfg.vllm_args == (("enable_prefix_caching", True),
                             ("distributed_executor_backend", "ray"))
    env = {"RAGSERVE_ENGINE": "vllm", "RAGSERVE_DEVICE": "neuron",
           "RAGSERVE_CONTEXT_ENCODING_BUCKETS": "128,512",
           "RAGSERVE_VLLM_ARG": "max_num_batched_tokens=512 override_neuron_config="
                                """'{"sequence_parallel_enabled": false, "skip_warmup": true}'"""}
    cfg = config_from_args([], environ=env)
    assert cfg.context_encoding_buckets == (128, 512)
    assert cfg.vllm_args == (("max_num_batched_tokens", 512), ("override_neuron_config", {
        "sequence_parallel_enabled": False, "skip_warmup": True}))
    # the command line adds to the environment's list; a repeated key takes the last value
    cfg = config_from_args(["--vllm-arg", "max_num_batched_tokens=1024"], environ=env)
    assert dict(cfg.vllm_args)["max_num_batched_tokens"] == 1024
    assert config_from_args([], environ={}).engine == "ragserve"


def test_chat_template_is_a_file_or_a_template(tmp_path: Path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert ServerConfig(chat_template=str(f)).chat_template_text() == "{{ messages[0]['content'] }}"
    assert ServerConfig(chat_template="{{ x }}").chat_template_text() == "{{ x }}"
    with pytest.raises(ConfigError, match="--chat-template"):
        ServerConfig(chat_template="no-such-file.jinja").chat_template_text()


def test_sagemaker_port_errors_name_the_variable():
    with pytest.raises(ConfigError, match=r"got 70000 \(from SAGEMAKER_BIND_TO_PORT\)"):
        config_from_args([], environ={"SAGEMAKER_BIND_TO_PORT": "70000"})
    with pytest.raises(ConfigError, match="SAGEMAKER_BIND_TO_PORT must be an integer"):
        config_from_args([], environ={"SAGEMAKER_BIND_TO_PORT": "http"})
    env = {"SAGEMAKER_BIND_TO_PORT": "8080", "RAGSERVE_PORT": "9000"}
    assert config_from_args([], environ=env).port == 8080


# -- the command line: one subparser per command, each flag declared once ---------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def test_ragserve_help_lists_every_command_and_each_has_help(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "run-batch", "generate", "index", "neuron", "buckets"):
        assert f"    {command} " in out
    for argv, flag in ((["serve"], "--max-queue-wait"), (["run-batch"], "--input-file"),
                       (["generate"], "--prompt"), (["buckets", "plan"], "--from"),
                       (["neuron", "plan"], "--instance"), (["index", "build"], "--out")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        assert flag in capsys.readouterr().out


def test_serve_run_batch_and_generate_share_the_engine_flags():
    from server.cli import build_parser

    def flags(p: argparse.ArgumentParser) -> dict[str, tuple]:
        return {a.option_strings[-1]: (a.dest, a.type, a.default, a.choices, a.nargs, a.const,
                                       a.help) for a in p._actions if a.option_strings}

    commands = subparsers(build_parser(environ={}))
    serve, batch, generate = (flags(commands[c]) for c in ("serve", "run-batch", "generate"))
    shared = {"--model", "--device", "--dtype", "--kv-cache-dtype", "--max-model-len",
              "--max-num-seqs", "--context-encoding-buckets", "--token-generation-buckets",
              "--compile", "--kernels", "--chat-template", "--cache-dir"}
    assert shared <= set(generate) and shared <= set(serve)
    assert {f: generate[f] for f in shared} == {f: serve[f] for f in shared}
    assert {f: v for f, v in batch.items() if f in serve} == serve
    # --dtype auto says what runtime.loader.resolve_dtype does
    assert "bfloat16 on CUDA and on CPUs with native bf16" in generate["--dtype"][-1]
    args = commands["generate"].parse_args(["--prompt", "x", "--compile", "false"])
    assert args.compile is False
    assert commands["generate"].parse_args(["--prompt", "x", "--compile"]).compile is True


def test_serve_and_run_batch_read_the_environment_generate_does_not():
    from server.cli import build_parser
    from server.config import config_from_namespace

    p = build_parser(environ={"RAGSERVE_MAX_NUM_SEQS": "3", "RAGSERVE_COMPILE": "true",
                              "RAGSERVE_INPUT_FILE": "x.jsonl"})
    serve = config_from_namespace(p.parse_args(["serve", "--port", "9"]))
    assert (serve.max_num_seqs, serve.compile, serve.port) == (3, True, 9)
    batch = p.parse_args(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"])
    assert config_from_namespace(batch).max_num_seqs == 3
    assert str(batch.input_file) == "in.jsonl"  # the batch flags are not ServerConfig's
    generate = p.parse_args(["generate", "--prompt", "x"])
    assert (generate.max_num_seqs, generate.compile) == (16, False)


def test_a_bad_variable_stops_only_the_commands_that_read_it(monkeypatch, capsys):
    from server.cli import build_parser, main

    monkeypatch.setenv("RAGSERVE_PORT", "http")
    assert main(["serve"]) == 2
    assert "ragserve serve: error: RAGSERVE_PORT (for --port)" in capsys.readouterr().err
    assert main(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"]) == 2
    assert "ragserve run-batch: error: RAGSERVE_PORT" in capsys.readouterr().err
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.prompt == "x"


def test_python_dash_m_server_is_ragserve_serve():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: ragserve serve") and "--max-queue-wait" in out
