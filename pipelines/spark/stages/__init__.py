"""Spark ML annotators with Spark NLP's names, parameters and annotation schema."""

from clinlong.pipelines.spark.stages.bigbird_embeddings import BigBirdEmbeddings
from clinlong.pipelines.spark.stages.document_assembler import DocumentAssembler
from clinlong.pipelines.spark.stages.embeddings_finisher import EmbeddingsFinisher
from clinlong.pipelines.spark.stages.longformer_embeddings import LongformerEmbeddings
from clinlong.pipelines.spark.stages.longformer_for_sequence_classification import (
    BigBirdForSequenceClassification,
    LongformerForSequenceClassification,
)
from clinlong.pipelines.spark.stages.longformer_for_token_classification import (
    BigBirdForTokenClassification,
    LongformerForTokenClassification,
)
from clinlong.pipelines.spark.stages.ner_converter import NerConverter
from clinlong.pipelines.spark.stages.sentence_detector import SentenceDetector
from clinlong.pipelines.spark.stages.sentence_embeddings import SentenceEmbeddings
from clinlong.pipelines.spark.stages.tokenizer import Tokenizer

__all__ = [
    "DocumentAssembler",
    "SentenceDetector",
    "Tokenizer",
    "LongformerEmbeddings",
    "BigBirdEmbeddings",
    "SentenceEmbeddings",
    "EmbeddingsFinisher",
    "LongformerForSequenceClassification",
    "BigBirdForSequenceClassification",
    "LongformerForTokenClassification",
    "BigBirdForTokenClassification",
    "NerConverter",
]
