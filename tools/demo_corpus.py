"""The demo model's training text: CPython's own documentation, collected offline.

Two sources, both shipped with the interpreter that runs this script:

* `pydoc_data.topics` — the help pages that `help("with")` shows, generated from CPython's
  `Doc/` reStructuredText (Python Software Foundation License; code samples in the docs are
  also offered under the Zero-Clause BSD license).
* docstrings of a fixed list of standard-library modules (`inspect.getdoc` on each module and
  on its public classes, functions and methods) — part of CPython's source (PSF License).

Everything is deterministic: modules in a fixed order, members sorted by name, duplicate texts
dropped (first one wins), and a document is held out when a hash of its text says so (~2%), so
the split does not depend on the order either. Used by `tools/train_demo_model.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import sys
import warnings
from dataclasses import dataclass

# Pure standard-library modules whose import has no side effects (no windows opening, no
# printing, no network). Platform-specific or private modules are simply skipped when absent.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks",
    "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd",
    "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "copyreg",
    "csv", "ctypes", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email", "email.charset", "email.encoders", "email.errors", "email.generator",
    "email.header", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.entities", "html.parser",
    "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib",
    "importlib", "importlib.abc", "importlib.machinery", "importlib.metadata",
    "importlib.resources", "importlib.util", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging",
    "logging.config", "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes",
    "mmap", "modulefinder", "multiprocessing", "multiprocessing.pool",
    "multiprocessing.managers", "multiprocessing.shared_memory", "netrc", "numbers",
    "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pickletools",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "runpy",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep",
    "struct", "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest",
    "unittest.mock", "urllib", "urllib.error", "urllib.parse", "urllib.request",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "wsgiref",
    "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.validate", "xml", "xml.dom",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xml.sax.saxutils", "xmlrpc", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile",
    "zipimport", "zlib", "zoneinfo",
    # More pure-Python modules, and the pure-Python twins of C modules, whose docstrings are
    # long and prose-like.
    "_collections_abc", "_pydecimal", "_pyio", "_strptime", "_threading_local",
    "_weakrefset", "chunk", "genericpath", "mailcap", "nntplib", "ntpath", "opcode", "pipes",
    "posixpath", "sndhdr", "imghdr", "sunau", "telnetlib", "uu", "xdrlib", "cgi", "cgitb",
    "asynchat", "asyncore", "dbm", "dbm.dumb", "smtpd", "select", "resource", "pwd", "grp",
    "fcntl", "termios", "tty", "pty",
)
"""Top-level names; the public submodules of the packages among them are walked too
(`pkgutil.iter_modules`, sorted), except the names in `SKIP_SUBMODULES`."""

SKIP_SUBMODULES = frozenset({"__main__", "test", "tests", "tool", "idlelib", "tkinter",
                             "turtle", "turtledemo", "antigravity", "this"})

HELDOUT_MODULUS = 50
"""A document is held out when sha256(text) % HELDOUT_MODULUS == 0 (about 2%)."""

MIN_DOC_CHARS = 40
"""Shorter docstrings ("Return self." and the like) carry no prose and are dropped."""


@dataclass(frozen=True)
class Document:
    """One training document: `title` names the object (e.g. `json.dumps`), `text` is what the
    model sees (a header line with the signature, a blank line, the docstring)."""
    title: str
    text: str
    kind: str  # "topic", "module", "class", "function" or "method"


def topic_documents() -> list[Document]:
    from pydoc_data import topics
    return [Document(name, text.strip(), "topic")
            for name, text in sorted(topics.topics.items())]


class _Elided:
    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()


def _is_literal(value: object, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):  # not a path: those name this machine's directories
        return len(value) <= 40 and not (len(value) > 1 and value[0] in "/~\\")
    if isinstance(value, bytes):
        return len(value) <= 40
    if isinstance(value, tuple) and depth == 0:  # (a frozenset's order varies by hash seed)
        return len(value) <= 8 and all(_is_literal(v, 1) for v in value)
    return False


def _signature(obj: object) -> str:
    """`(a, b=1, *, key=...)`: annotations dropped and every default that is not a short literal
    shown as `...`. A default's repr can hold a memory address (`<object object at 0x…>`), a
    path on this machine (`executable=sys.executable`) or the whole environment
    (`env=os.environ`), which would make the corpus differ from machine to machine and run to
    run, and leak the machine's settings into the weights."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = [p.replace(annotation=p.empty,
                        default=p.default if p.default is p.empty or _is_literal(p.default)
                        else _ELIDED)
              for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def _import_quietly(name: str):
    """Import `name` with warnings and stdout/stderr suppressed; None if it cannot be imported."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):  # noqa: BLE001  (any failure means: skip this module)
        return None


def _is_doc_member(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(obj)


def module_documents(name: str) -> list[Document]:
    """The module docstring, then each public class/function defined in it (sorted by name),
    each class followed by its public methods (sorted by name)."""
    module = _import_quietly(name)
    if module is None:
        return []
    docs: list[Document] = []

    def add(title: str, header: str, obj: object, kind: str) -> None:
        try:
            text = inspect.getdoc(obj)
        except Exception:  # noqa: BLE001  (a broken __doc__ property: skip it)
            text = None
        if text and len(text.strip()) >= MIN_DOC_CHARS:
            docs.append(Document(title, f"{header}\n\n{text.strip()}", kind))

    add(name, f"Module {name}", module, "module")
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or not _is_doc_member(obj):
            continue
        if getattr(obj, "__module__", None) != name:
            continue  # re-exported from elsewhere: documented by its home module
        title = f"{name}.{attr}"
        if inspect.isclass(obj):
            add(title, f"class {title}{_signature(obj)}", obj, "class")
            for method_name, method in sorted(vars(obj).items()):
                if method_name.startswith("_") or not inspect.isroutine(method):
                    continue
                method_title = f"{title}.{method_name}"
                add(method_title, f"{method_title}{_signature(method)}", method, "method")
        else:
            add(title, f"{title}{_signature(obj)}", obj, "function")
    return docs


def module_names(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """`modules` in order, each package followed by its public submodules, recursively."""
    import pkgutil
    out: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        out.append(name)
        module = _import_quietly(name)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", None) or []),
                           key=lambda i: i.name):
            if info.name.startswith("_") or info.name in SKIP_SUBMODULES:
                continue
            if "win" in info.name.lower():
                continue  # Windows-only, and importing some of them fails noisily elsewhere
            visit(f"{name}.{info.name}")

    for name in modules:
        visit(name)
    return out


def collect_documents(modules: tuple[str, ...] = STDLIB_MODULES) -> list[Document]:
    """All documents in a fixed order (topics, then modules in `module_names` order),
    duplicates of an earlier text (docstrings inherited by many methods) dropped."""
    seen: set[str] = set()
    out: list[Document] = []
    names = module_names(modules)
    for doc in topic_documents() + [d for m in names for d in module_documents(m)]:
        body = doc.text.split("\n\n", 1)[-1]
        if body in seen:
            continue
        seen.add(body)
        out.append(doc)
    return out


def collect_documents_isolated() -> list[Document]:
    """`collect_documents()` in a fresh `python -I -S` child: only the standard library is on
    its path and nothing else has been imported, so no third-party monkeypatch (transformers
    adds methods to `logging.Logger`, torch wraps `inspect.getfile`) leaks into the corpus."""
    import json
    import subprocess
    proc = subprocess.run([sys.executable, "-I", "-S", __file__], check=True,
                          capture_output=True)
    return [Document(**d) for d in json.loads(proc.stdout)]


def is_heldout(doc: Document) -> bool:
    digest = hashlib.sha256(doc.text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_heldout(d)]
    heldout = [d for d in docs if is_heldout(d)]
    return train, heldout


def corpus_digest(docs: list[Document]) -> str:
    """sha256 over all document texts, in order: equal digests mean equal training text."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.text.encode("utf-8") + b"\0")
    return h.hexdigest()


def corpus_provenance() -> str:
    """One line naming the interpreter the corpus came from (the text differs across versions)."""
    return (f"CPython {sys.version.split()[0]} ({sys.implementation.cache_tag}), "
            f"pydoc_data.topics + docstrings of {len(STDLIB_MODULES)} standard-library modules")


if __name__ == "__main__":
    import dataclasses
    import json
    out = json.dumps([dataclasses.asdict(d) for d in collect_documents()])
    sys.stdout.write(out)
