"""Modules that hold a weight in a format (compressed linear layers, embeddings, tied heads, unfused
experts), and the one place that knows how a model's weight matrices are laid out (:mod:`.layout`)."""

from matpress.nn.layers import (
    CompressedEmbedding, CompressedLinear, FormatModule, TiedLinear, check_plain_embedding, decoded_forwards,
)

__all__ = ["CompressedEmbedding", "CompressedLinear", "FormatModule", "TiedLinear", "check_plain_embedding", "decoded_forwards"]
