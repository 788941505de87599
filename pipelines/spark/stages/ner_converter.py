"""NerConverter: [document or sentence, token, named_entity] → `chunk`, as Spark NLP's NerConverter.

Tags are read per input annotation (document or sentence), in token order, as Spark NLP's NerTagsEncoding.fromIOB
reads them:
- "B-X" closes the open chunk and opens an X chunk; "O" (and an empty tag: a token with no tag, see
  LongformerForTokenClassification) closes it; "I-X" continues the open chunk (whatever its entity, as Spark NLP
  does) or opens an X chunk after "O"; a tag without a prefix opens a chunk of the whole tag (Spark NLP would
  drop its first two characters: set nerHasNoSchema for such tags);
- nerHasNoSchema=True (tags without B-/I- prefixes): each run of tokens with the same tag other than "O" is one
  chunk of that entity.
A chunk's begin/end are its first token's begin and its last token's end (character offsets into the stored text,
end inclusive); `result` is the text between them (preservePosition, the default) or its first word; metadata
{"entity", "sentence": the index of the input annotation among those holding tags, "chunk": its index in the row
after whiteList, "confidence": the mean of its tokens' tag confidences, when they have one}.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.sql import DataFrame

from clinlong.pipelines.core.heads import chunks_from_tags
from clinlong.pipelines.spark.annotation import CHUNK, DOCUMENT, NAMED_ENTITY, TOKEN, annotations_array
from clinlong.pipelines.spark.stages._base import AnnotatorStage


class NerConverter(AnnotatorStage):
    inputAnnotatorTypes = ((DOCUMENT,), (TOKEN,), (NAMED_ENTITY,))
    outputAnnotatorType = CHUNK
    whiteList = Param(
        Params._dummy(), "whiteList", "if set, the entities to keep (without IOB prefix)", TypeConverters.toListString
    )
    preservePosition = Param(
        Params._dummy(),
        "preservePosition",
        "result: the stored text between the chunk's offsets (True) or its first word",
        TypeConverters.toBoolean,
    )
    nerHasNoSchema = Param(
        Params._dummy(), "nerHasNoSchema", "tags without an IOB/IOB2 prefix", TypeConverters.toBoolean
    )

    def __init__(self):
        super().__init__()
        self._setDefault(
            inputCols=["document", "token", "ner"], outputCol="ner_chunk", preservePosition=True, nerHasNoSchema=False
        )

    def setWhiteList(self, entities):
        return self._set(whiteList=list(entities))

    def setPreservePosition(self, value: bool):
        return self._set(preservePosition=value)

    def setNerHasNoSchema(self, value: bool):
        return self._set(nerHasNoSchema=value)

    def _transform(self, df: DataFrame) -> DataFrame:
        self._check_inputs(df)
        doc_col, _, ner_col = self.getInputCols()[:3]
        keep = set(self.getOrDefault(self.whiteList)) if self.isSet(self.whiteList) else None
        preserve, no_schema = self.getOrDefault(self.preservePosition), self.getOrDefault(self.nerHasNoSchema)

        def convert(batch: pa.RecordBatch) -> pa.Array:
            rows = []
            for docs, ner in zip(batch.column(doc_col).to_pylist(), batch.column(ner_col).to_pylist()):
                out, held = [], 0
                for d in docs or []:
                    b0, e0 = d["begin"], d["end"]
                    tags = []
                    for a in ner or []:
                        if b0 <= a["begin"] <= e0:
                            meta = dict(a["metadata"] or ())
                            conf = meta.get("confidence")
                            try:
                                conf = float(conf) if conf is not None else None
                            except ValueError:
                                conf = None
                            tags.append((a["begin"], a["end"], a["result"], meta.get("word", ""), conf))
                    if not tags:
                        continue
                    for begin, end, entity, word, conf in chunks_from_tags(tags, no_schema):
                        if keep is not None and entity not in keep:
                            continue
                        meta = {"entity": entity, "sentence": str(held), "chunk": str(len(out))}
                        if conf is not None:
                            meta["confidence"] = str(np.float32(conf))
                        text = d["result"][begin - b0 : end - b0 + 1] if preserve else word
                        out.append((CHUNK, begin, end, text, meta))
                    held += 1
                rows.append(out)
            return annotations_array(rows)

        return self._map_batches(df, convert)
