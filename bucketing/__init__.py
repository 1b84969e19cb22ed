"""Static-shape buckets: lists, selection and planning. Standard library only."""

from bucketing.buckets import (
    DECODE,
    PREFILL,
    Bucket,
    BucketConfig,
    BucketError,
    generate_buckets,
    generate_dense_buckets,
    select,
)
from bucketing.planner import padding_ratio, plan_buckets

__all__ = [
    "DECODE",
    "PREFILL",
    "Bucket",
    "BucketConfig",
    "BucketError",
    "generate_buckets",
    "generate_dense_buckets",
    "padding_ratio",
    "plan_buckets",
    "select",
]
