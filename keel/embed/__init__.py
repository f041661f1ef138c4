"""Embedding models: BERT-family encoders (bert.py), the pooling their sentence-transformers files
describe (pooling.py), and the batched model behind /v1/embeddings (model.py)."""

from keel.embed.model import BUILTIN_NAME, EmbeddingModel, builtin_embedding_path

__all__ = ["BUILTIN_NAME", "EmbeddingModel", "builtin_embedding_path"]
