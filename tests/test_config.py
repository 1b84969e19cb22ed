"""ServerConfig: flags, RAGSERVE_* variables, SageMaker's port, errors that name the flag."""

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
