import pytest

from bucketing import (
    DECODE,
    PREFILL,
    Bucket,
    BucketConfig,
    BucketError,
    generate_buckets,
    generate_dense_buckets,
    padding_ratio,
    plan_buckets,
    select,
)


def test_generate_buckets_exact_lists():
    assert generate_buckets(128, 2048) == [128, 256, 512, 1024, 2048]
    assert generate_buckets(128, 513) == [128, 256, 513]
    assert generate_buckets(128, 128) == [128]
    assert generate_buckets(1, 16) == [1, 2, 4, 8, 16]
    assert generate_buckets(1, 1) == [1]


def test_dense_buckets_exact_lists():
    assert generate_dense_buckets(128, 4096) == [
        128, 160, 192, 256, 320, 416, 512, 640, 800, 1024, 1280, 1632, 2048, 2592, 3264, 4096
    ]
    assert generate_dense_buckets(128, 2048, per_octave=2) == [
        128, 192, 256, 352, 512, 736, 1024, 1440, 2048
    ]
    assert generate_dense_buckets(16, 128) == [16, 20, 24, 32, 40, 52, 64, 80, 100, 128]
    assert generate_dense_buckets(128, 4096, per_octave=1) == generate_buckets(128, 4096)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 128), (127, 128), (128, 128), (129, 256), (256, 256), (257, 512), (512, 512)],
)
def test_select_smallest_bucket_at_least_n(n, expected):
    assert select([128, 256, 512], n) == expected


def test_select_past_largest_names_the_limit():
    with pytest.raises(BucketError, match=r"prompt length 513 exceeds the largest bucket \(512\)"):
        select([128, 256, 512], 513, "prompt length")


def test_bucket_validates_phase_and_sizes():
    with pytest.raises(ValueError, match="phase"):
        Bucket("train", 1, 128)
    with pytest.raises(ValueError, match=">= 1"):
        Bucket(PREFILL, 0, 128)
    assert Bucket(PREFILL, 2, 128).input_tokens == 256
    assert Bucket(DECODE, 4, 512).input_tokens == 4
    assert str(Bucket(DECODE, 4, 512)) == "decode[4x512]"


def test_default_config_lists():
    cfg = BucketConfig.default(2048, 16)
    assert cfg.context_encoding_buckets == (
        128, 160, 192, 256, 320, 416, 512, 640, 800, 1024, 1280, 1632, 2048
    )
    assert cfg.token_generation_buckets == (128, 256, 512, 1024, 2048)
    assert cfg.decode_batch_buckets == (1, 2, 4, 8, 16)
    assert cfg.prefill_batch_buckets == (1, 2, 4)
    assert cfg.max_prefill_tokens == 2048
    assert cfg.max_prompt_len == 2048


def test_config_selection():
    cfg = BucketConfig.default(1024, 8)
    assert cfg.prefill(100) == Bucket(PREFILL, 1, 128)
    assert cfg.prefill(193, 3) == Bucket(PREFILL, 4, 256)
    assert cfg.prefill(416) == Bucket(PREFILL, 1, 416)
    assert cfg.decode(129, 5) == Bucket(DECODE, 8, 256)
    assert cfg.decode(1024, 8) == Bucket(DECODE, 8, 1024)
    with pytest.raises(BucketError, match=r"context length 1025 exceeds the largest bucket"):
        cfg.decode(1025, 1)
    with pytest.raises(BucketError, match="decode batch size 9"):
        cfg.decode(10, 9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(context_encoding_buckets=(128, 4096)),
         r"context_encoding_bucket \(4096\) exceeds max_model_len \(2048\)"),
        (dict(token_generation_buckets=(128, 1024)),
         r"token_generation_bucket \(1024\) must equal max_model_len \(2048\)"),
        (dict(context_encoding_buckets=(256, 128)), "strictly increasing"),
        (dict(context_encoding_buckets=()), "must not be empty"),
        (dict(context_encoding_buckets=(0, 128)), "positive integers"),
    ],
)
def test_config_validation_names_the_limit(kwargs, message):
    base = dict(
        max_model_len=2048,
        max_num_seqs=4,
        context_encoding_buckets=(128, 2048),
        token_generation_buckets=(2048,),
        decode_batch_buckets=(1, 4),
    )
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        BucketConfig(**base)


def test_all_buckets_respects_prefill_token_budget():
    cfg = BucketConfig(
        max_model_len=512,
        max_num_seqs=4,
        context_encoding_buckets=(128, 256, 512),
        token_generation_buckets=(256, 512),
        decode_batch_buckets=(2, 4),
        prefill_batch_buckets=(1, 2, 4),
        max_prefill_tokens=512,
    )
    assert cfg.all_buckets() == [
        Bucket(PREFILL, 1, 128), Bucket(PREFILL, 1, 256), Bucket(PREFILL, 1, 512),
        Bucket(PREFILL, 2, 128), Bucket(PREFILL, 2, 256),
        Bucket(PREFILL, 4, 128),
        Bucket(DECODE, 2, 256), Bucket(DECODE, 2, 512),
        Bucket(DECODE, 4, 256), Bucket(DECODE, 4, 512),
    ]


def test_padding_ratio_and_planner():
    lengths = [60] * 50 + [200] * 30 + [900] * 20
    pow2 = generate_buckets(128, 1024)
    planned = plan_buckets(lengths, 3, 1024)
    assert planned == [64, 256, 1024]
    assert padding_ratio(lengths, planned) < padding_ratio(lengths, pow2)
    with pytest.raises(ValueError, match=r"length 2000 exceeds max_len \(1024\)"):
        plan_buckets([2000], 2, 1024)
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        padding_ratio([2000], pow2)


def test_planner_is_optimal_on_small_cases():
    """Brute force over every pair of aligned boundaries agrees with the DP."""
    import itertools

    lengths = [13, 70, 70, 130, 250, 251, 400, 510]
    cands = sorted({-(-n // 64) * 64 for n in lengths} | {512})
    best = min(
        (padding_ratio(lengths, sorted(set(c) | {512})), sorted(set(c) | {512}))
        for c in itertools.combinations(cands, 2)
    )
    planned = plan_buckets(lengths, 3, 512)
    assert padding_ratio(lengths, planned) == pytest.approx(best[0])
