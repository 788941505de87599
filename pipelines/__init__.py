"""Spark ML stages and jobs that embed clinical notes with a Clinical-Longformer artifact."""
from .light import EmbeddingsPipeline, load
from .stages import (DocumentAssembler, EmbeddingsFinisher, LongformerEmbeddings, SentenceDetector,
                     SentenceEmbeddings, Tokenizer)

__all__ = ["load", "EmbeddingsPipeline", "DocumentAssembler", "SentenceDetector", "Tokenizer",
           "LongformerEmbeddings", "SentenceEmbeddings", "EmbeddingsFinisher"]
