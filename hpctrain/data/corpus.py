"""The built-in text corpus (no download): docstrings of the Python standard library.

Every machine with Python has it. The modules are imported in a child process (so whatever they do at
import time cannot touch the trainer), in sorted order; modules that fail to import, and those with
side effects (opening a browser, a GUI, printing), are skipped. The text is written once to
`<cache>/raw/stdlib-docs.txt` and prepared into token shards in `<cache>` (reused when present).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hpctrain.data.text import DataError, Log, prepare
from hpctrain.files import atomic_write

_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
         "pydoc_data", "xxsubtype", "xxlimited", "msilib", "winreg", "winsound", "_msi", "nturl2path", "msvcrt"}

_EXTRACT = r"""
import importlib, inspect, sys, warnings
warnings.simplefilter("ignore")
skip = set(sys.argv[1].split(","))
out = []
seen = set()
for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in skip:
        continue
    try:
        mod = importlib.import_module(name)
    except BaseException:
        continue
    docs = [inspect.getdoc(mod)]
    for attr in sorted(dir(mod)):
        try:
            obj = getattr(mod, attr)
        except BaseException:
            continue
        if getattr(obj, "__module__", None) != name or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for m in sorted(vars(obj)):
                if not m.startswith("_"):
                    docs.append(inspect.getdoc(vars(obj)[m]) if callable(vars(obj)[m]) else None)
    for d in docs:
        if d and d not in seen:
            seen.add(d)
            out.append(d.strip())
sys.stdout.write("\n\n".join(out) + "\n")
"""


def builtin_text() -> str:
    p = subprocess.run([sys.executable, "-c", _EXTRACT, ",".join(sorted(_SKIP))], capture_output=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    text = p.stdout.decode("utf-8", "replace").replace("\x00", "")
    if p.returncode != 0 or not text.strip():
        raise DataError(f"built-in corpus: extracting standard-library docstrings failed (exit {p.returncode})")
    return text


def prepare_builtin(cache: str, vocab_size: int, seq_len: int, log: Log = print) -> dict:
    raw = Path(cache) / "raw" / f"stdlib-docs-py{sys.version_info[0]}{sys.version_info[1]}.txt"
    if not raw.is_file():
        log(f"built-in corpus: extracting standard-library docstrings into {raw}")
        raw.parent.mkdir(parents=True, exist_ok=True)
        data = builtin_text().encode()
        atomic_write(raw, lambda f: f.write(data))
    return prepare([str(raw)], cache, vocab_size=vocab_size, seq_len=seq_len, log=log, progress=False)
