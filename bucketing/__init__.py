"""Static-shape buckets: lists, selection and planning. Standard library only."""

from bucketing.buckets import (
    CONTEXT_ENCODING_ENV,
    CONTEXT_ENCODING_FLAG,
    DECODE,
    DEFAULT_MIN_BUCKET,
    PREFILL,
    TOKEN_GENERATION_ENV,
    TOKEN_GENERATION_FLAG,
    Bucket,
    BucketConfig,
    BucketError,
    generate_buckets,
    generate_dense_buckets,
    select,
)
from bucketing.planner import padding_ratio, plan_buckets

__all__ = [
    "CONTEXT_ENCODING_ENV",
    "CONTEXT_ENCODING_FLAG",
    "DECODE",
    "DEFAULT_MIN_BUCKET",
    "PREFILL",
    "TOKEN_GENERATION_ENV",
    "TOKEN_GENERATION_FLAG",
    "Bucket",
    "BucketConfig",
    "BucketError",
    "generate_buckets",
    "generate_dense_buckets",
    "padding_ratio",
    "plan_buckets",
    "select",
]
