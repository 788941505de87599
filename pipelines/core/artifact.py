"""The one reader of model artifacts written by `python -m clinlong.export` (the pipeline never imports export)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

SUPPORTED_FORMAT = ("clinlong-native", 2)  # 2: packed rows (input_ids, position_ids)


class ArtifactError(Exception):
    """The artifact is missing, incomplete or altered; the message says how to fix it."""


# The artifact's files: written by export (clinlong.export.native), read here.
ONNX_FILE, TOKENIZER_FILE, PARITY_FILE, MANIFEST_FILE = "encoder.onnx", "tokenizer.json", "parity.json", "manifest.json"
WEIGHTS_FILE = "encoder.safetensors"  # the same weights for the torch runtime (bf16/fp16, GPUs)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks (checkpoint hashes, manifest digests, verification)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Artifact":
        """Read the manifest; with `verify`, check every file's sha256 against it."""
        path = Path(path).expanduser()
        mf = path / MANIFEST_FILE
        if not mf.is_file():
            raise ArtifactError(f"{path} is not a model artifact (no manifest.json); "
                                "create one with: python -m clinlong.export CHECKPOINT OUT")
        manifest = json.loads(mf.read_text())
        fmt = (manifest.get("format"), manifest.get("format_version"))
        if fmt != SUPPORTED_FORMAT:
            raise ArtifactError(f"{path} has artifact format {fmt}, this pipeline reads {SUPPORTED_FORMAT}; "
                                "re-export it: python -m clinlong.export CHECKPOINT OUT --overwrite")
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    def verify(self, names: list[str] | None = None) -> None:
        """Check the sha256 of every file (or of `names`, those a runtime reads) against the manifest."""
        files = self.manifest["files"]
        for name in names if names is not None else files:
            digest = files.get(name)
            f = self.path / name
            if digest is None:
                raise ArtifactError(f"artifact file {f} is not in the manifest; re-export the artifact")
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing; re-export the artifact")
            if file_sha256(f) != digest:
                raise ArtifactError(f"artifact file {f} fails its sha256 check (corrupt or altered); re-export the artifact")

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest["onnx"]["file"]

    @property
    def torch_weights_path(self) -> Path:
        return self.path / self.manifest["torch"]["file"]

    @property
    def encoder_config(self) -> dict:
        """The encoder's config for the torch runtime (fields of core.model.EncoderConfig)."""
        return dict(self.manifest["torch"]["encoder_config"])

    def token_id(self, name: str) -> int:
        return int(self.manifest["special_tokens"][name]["id"])

    @property
    def model_type(self) -> str:
        """The family (core.model.MODEL_TYPES): longformer or big_bird."""
        return self.manifest.get("model_type", "longformer")

    @property
    def sequence_frame(self) -> tuple[int, int]:
        """The ids the checkpoint's tokenizer puts around each sequence (<s> ... </s>, [CLS] ... [SEP])."""
        frame = self.manifest.get("sequence_frame") or {"start": self.token_id("bos"), "end": self.token_id("eos")}
        return int(frame["start"]), int(frame["end"])

    @property
    def word_marker(self) -> str | None:
        """SentencePiece's word-boundary marker ("▁") where the tokenizer has one, else None."""
        return self.manifest.get("word_marker")

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))
        tok.no_truncation()
        tok.no_padding()
        return tok
