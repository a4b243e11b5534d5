"""lhotse data for every recipe: the generated corpus, tokenizers, dp-sharded global batches."""
