"""The one reader of model artifacts written by `python -m clinlong.export` (the pipeline never imports export)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from clinlong.pipelines.core.encoder_config import EncoderConfig
from clinlong.pipelines.core.errors import ArtifactError  # noqa: F401 - re-exported: defined in core.errors
from clinlong.pipelines.core.heads import Head, HeadModel, read_head_weights

SUPPORTED_FORMAT = ("clinlong-native", 2)  # 2: packed rows (input_ids, position_ids)


# The artifact's files: written by export (clinlong.export.native), read here.
ONNX_FILE, TOKENIZER_FILE, PARITY_FILE, MANIFEST_FILE = "encoder.onnx", "tokenizer.json", "parity.json", "manifest.json"
WEIGHTS_FILE = "encoder.safetensors"  # the same weights for the torch runtime (bf16/fp16, GPUs)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a failure to read or load artifact file `path` into one ArtifactError line that names the file
    and the fix (permission, missing, truncated or unreadable), instead of a library's traceback."""
    try:
        yield
    except ArtifactError:
        raise
    except PermissionError:
        raise ArtifactError(
            f"cannot read artifact file {path}: permission denied for this user (uid {os.getuid()}); "
            f"its owner can make the artifact readable with: chmod -R a+rX {path.parent}"
        ) from None
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact file {path} is missing; re-export the artifact: "
            "python -m clinlong.export CHECKPOINT OUT --overwrite"
        ) from None
    except IsADirectoryError:
        raise ArtifactError(f"artifact file {path} is a directory; re-export the artifact") from None
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file, reported by the library that parses it
        raise ArtifactError(
            f"artifact file {path} cannot be loaded ({type(e).__name__}: truncated or corrupt); "
            "re-export the artifact: python -m clinlong.export CHECKPOINT OUT --overwrite"
        ) from None


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in chunks (checkpoint hashes, manifest digests, verification)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class VerifiedFiles:
    """Files this machine has hashed and found equal to their manifest digest, remembered by what any write
    changes (device, inode, size, modification and change times, as git's index does), so that a node's
    Python workers and the driver do not each hash the same gigabyte. A marker per file version in a
    per-user folder; a file changed in the last seconds is not remembered (timestamps are coarse)."""

    SETTLE_NS = 2_000_000_000

    def __init__(self, folder: Path | None = None):
        self.folder = folder or Path(tempfile.gettempdir()) / f"clinlong-verified-{os.getuid()}"

    @staticmethod
    def _key(path: Path, digest: str, st: os.stat_result) -> str:
        ident = [str(path.resolve()), digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()

    def _ours(self) -> bool:
        """The folder exists and is this user's alone (never trust markers another user could write)."""
        try:
            st = self.folder.stat()
        except OSError:
            return False
        return st.st_uid == os.getuid() and not st.st_mode & 0o022

    def known(self, path: Path, digest: str) -> bool:
        return self._ours() and (self.folder / self._key(path, digest, path.stat())).exists()

    def add(self, path: Path, digest: str, before: os.stat_result) -> None:
        """Remember a file hashed between `before` and now, unless it changed meanwhile or just before."""
        after = path.stat()
        changed = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
            after.st_size,
            after.st_mtime_ns,
            after.st_ctime_ns,
        )
        if changed or time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) < self.SETTLE_NS:
            return
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            if self._ours():
                (self.folder / self._key(path, digest, after)).touch()
        except OSError:  # a read-only or full temp folder: hash again next time
            pass


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
            raise ArtifactError(
                f"{path} is not a model artifact (no manifest.json); "
                "create one with: python -m clinlong.export CHECKPOINT OUT"
            )
        with reading(mf):
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        fmt = (manifest.get("format"), manifest.get("format_version"))
        if fmt != SUPPORTED_FORMAT:
            raise ArtifactError(
                f"{path} has artifact format {fmt}, this pipeline reads {SUPPORTED_FORMAT}; "
                "re-export it: python -m clinlong.export CHECKPOINT OUT --overwrite"
            )
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    def verify(self, names: list[str] | None = None) -> None:
        """Check the sha256 of every file (or of `names`, those a runtime reads) against the manifest;
        a file this machine has verified unchanged since (VerifiedFiles) is not hashed again."""
        files = self.manifest["files"]
        verified = VerifiedFiles()
        for name in names if names is not None else files:
            digest = files.get(name)
            f = self.path / name
            if digest is None:
                raise ArtifactError(f"artifact file {f} is not in the manifest; re-export the artifact")
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing; re-export the artifact")
            if verified.known(f, digest):
                continue
            with reading(f):
                before = f.stat()
                actual = file_sha256(f)
            if actual != digest:
                raise ArtifactError(
                    f"artifact file {f} fails its sha256 check (corrupt or altered); re-export the artifact"
                )
            verified.add(f, digest, before)

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
    def encoder_config(self) -> EncoderConfig:
        """The encoder's config (frozen), as the export recorded it in the manifest."""
        return EncoderConfig.from_manifest(self.manifest["torch"]["encoder_config"])

    @property
    def head(self) -> Head | None:
        """The fine-tuned head (kind, labels in id order, problem_type, activation, the encoder's global attention)
        of an artifact exported from a *ForSequenceClassification / *ForTokenClassification checkpoint; None for
        an embedding model. `core.heads.HeadModel.load(artifact)` loads its weights and runs it."""
        entry = self.manifest.get("head")
        return Head.from_manifest(entry) if entry else None

    def load_head(self, verify: bool = True) -> HeadModel:
        """The fine-tuned head with its weights (HeadModel: logits and probabilities from the encoder's last
        hidden state), its file sha256-checked with `verify`; one ArtifactError line for an embedding model."""
        head = self.head
        if head is None:
            raise ArtifactError(
                f"{self.path} holds no fine-tuned head (an embedding model); export a "
                "*ForSequenceClassification or *ForTokenClassification checkpoint for classification "
                "or NER: python -m clinlong.export CHECKPOINT OUT"
            )
        if verify:
            self.verify([head.file])
        path = self.path / head.file
        with reading(path):
            weights = read_head_weights(path)
        return HeadModel(head, weights)

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

        path = self.path / self.manifest["tokenizer"]
        with reading(path):
            tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        return tok
