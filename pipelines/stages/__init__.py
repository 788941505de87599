"""Spark ML annotators with Spark NLP's names, parameters and annotation schema."""
from .document_assembler import DocumentAssembler
from .embeddings_finisher import EmbeddingsFinisher
from .longformer_embeddings import LongformerEmbeddings
from .sentence_detector import SentenceDetector
from .sentence_embeddings import SentenceEmbeddings
from .tokenizer import Tokenizer

__all__ = ["DocumentAssembler", "SentenceDetector", "Tokenizer", "LongformerEmbeddings",
           "SentenceEmbeddings", "EmbeddingsFinisher"]
