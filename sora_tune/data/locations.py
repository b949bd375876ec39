"""Where data lives when a trial is not told: the environment variables naming the GLUE folder
and the tokenisation cache. Kept apart so that trial settings can be checked without loading the
data libraries."""

DATA_DIR_ENV = "SORA_TUNE_DATA_DIR"  # folder in the GLUE layout, used when no data_dir is passed
CACHE_ENV = "SORA_TUNE_CACHE"  # folder of tokenized splits; default ~/.cache/sora_tune/tokenized
