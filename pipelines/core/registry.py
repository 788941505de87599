"""Model names → artifact directories under $CLINLONG_MODELS (default ~/.cache/clinlong/models)."""

from __future__ import annotations

import os
from pathlib import Path

from clinlong.pipelines.core.artifact import MANIFEST_FILE, ArtifactError

# nlu-style references and Spark NLP-style (name, lang) pairs that mean the same artifact.
ALIASES = {
    "en.embed.longformer.clinical": ("clinical_longformer", "en"),
    "en.embed.longformer.clinical_longformer": ("clinical_longformer", "en"),
    "fr.embed.longformer.drlongformer": ("drlongformer", "fr"),
    "fr.embed.longformer.drbert_4096": ("drbert_4096", "fr"),
    "en.embed.bigbird.clinical": ("clinical_bigbird", "en"),
    "en.embed.bigbird.clinical_bigbird": ("clinical_bigbird", "en"),
}
# nlu-style task names of fine-tuned heads (LANG.TASK.FAMILY.NAME resolves to NAME in LANG): classification, NER.
HEAD_TASKS = ("classify", "ner")
# The Hugging Face checkpoint each registered name is exported from (named in the error that says how).
HUB_IDS = {
    "clinical_longformer": "yikuan8/Clinical-Longformer",
    "drlongformer": "abazoge/DrLongformer",
    "drbert_4096": "abazoge/DrBERT-4096",
    "clinical_bigbird": "yikuan8/Clinical-BigBird",
}


def models_dir() -> Path:
    return Path(os.environ.get("CLINLONG_MODELS", "~/.cache/clinlong/models")).expanduser()


def resolve(name: str = "clinical_longformer", lang: str = "en") -> Path:
    """The artifact directory for `name`: DIR/name_lang or DIR/name, or a clear error that says what to do."""
    if name in ALIASES:
        name, lang = ALIASES[name]
    if Path(name).expanduser().is_dir() and (Path(name).expanduser() / MANIFEST_FILE).exists():
        return Path(name).expanduser()
    lang_, task, family, *rest = name.split(".") + ["", "", ""]
    if task in HEAD_TASKS and family in ("longformer", "bigbird") and rest[0] and not rest[1]:
        name, lang = rest[0], lang_  # nlu style for fine-tuned heads: en.classify.longformer.<name> -> <name>_en
    if "/" in name or "\\" in name or name.startswith(("~", ".")):  # a path, not a registered name
        path = Path(name).expanduser()
        what = "is a folder without manifest.json" if path.is_dir() else "does not exist"
        raise ArtifactError(
            f"{name} {what}, so it is not a model artifact; create one with: "
            f"python -m clinlong.export CHECKPOINT {name}"
        )
    root = models_dir()
    for candidate in (root / f"{name}_{lang}", root / name):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"model {name!r} ({lang}) is not in {root}. Export it there: "
        f"python -m clinlong.export {HUB_IDS.get(name, 'CHECKPOINT')} {root / f'{name}_{lang}'} "
        f"(or a local checkpoint directory), or set CLINLONG_MODELS to the folder that holds it"
    )
