"""The multi-domain text corpus, built deterministically from files that exist on this machine.

Nothing can be downloaded here (DESIGN.md, "Models"), so the training text is what a Debian
machine with Python, C and C++ headers, Perl, man pages and npm already holds:

| domain | source | reader |
| --- | --- | --- |
| `python` | the interpreter's standard library (`sysconfig` "stdlib", no site-packages) | UTF-8 source |
| `c` | C headers under `/usr/include` | UTF-8 source |
| `javascript` | npm's own sources under `/usr/lib/node_modules` (no `*.min.js`, no line > 300 chars) | UTF-8 source |
| `english` | man pages, sections 1, 5, 7, 8 (`/usr/share/man/man{1,5,7,8}`) | rendered by `man` |
| `german` | German man pages (`/usr/share/man/de`) and German gettext catalogs' translations | `man`, a `.mo` reader |
| `cpp` | libstdc++'s headers under `/usr/include/c++` without a `.h` suffix (`<vector>`, `*.tcc`, `*.hpp`) | UTF-8 source |
| `perl` | Perl's core library, `/usr/share/perl/**/*.{pm,pl}` (code with its POD) | UTF-8 source |
| `french` | French man pages (`/usr/share/man/fr`) and French gettext catalogs' translations | `man`, a `.mo` reader |

(Catalogs: `/usr/share/locale/{de,fr}/LC_MESSAGES/*.mo`, without the `iso_*` name lists. The
`cpp` domain leaves `.h` files to `c`, whose `/usr/include/**/*.h` includes libstdc++'s, so the
two never share a file.)

Which domains a corpus holds is a choice (`DOMAIN_SETS`, the command line's `--domains`): the
first model used the five of `DOMAINS`; the manifest lists the corpus' domains in order, and
every later stage takes the list from there (`corpus_domains`), not from a constant. A domain is
built the same whichever set it is part of.

Determinism: each domain's candidate files are ordered by the SHA-1 of their path, so the
selection is spread over the whole tree and does not depend on directory listing order. The
split is by file: a file whose path hash is 0 modulo `heldout_modulus` goes to the held-out
split, every other file to the training split; each split takes files in that order until its
byte budget is reached (the last file may overshoot it). A text longer than `max_file_bytes`
keeps only its lines up to that size, so one huge file cannot fill a domain. Man pages are
rendered with fixed width, no hyphenation and no justification, in the C.UTF-8 locale. A
missing source is an error that names it and what provides it.

Layout written under the output directory::

    corpus/<domain>.train.jsonl      one document per line: {"path": ..., "text": ...}
    corpus/<domain>.heldout.jsonl
    corpus/manifest.json             sources, file counts, bytes and SHA-256 per split
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("python", "c", "javascript", "english", "german")
"""The first model's five domains, in the order its reports list them (the default set)."""

DOMAIN_SETS: dict[str, tuple[str, ...]] = {
    "5domains": DOMAINS,
    "8domains": (*DOMAINS, "cpp", "perl", "french"),
}
"""Named domain sets (`--domains`); a corpus' domains come in the order named here."""

_MAN_ENV = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"}
_MAX_JS_LINE = 300  # characters; longer lines mark minified or generated code
_ISO_CATALOG = re.compile(r"^iso_")


@dataclass(frozen=True)
class CorpusConfig:
    """What the corpus takes from each domain.

    Attributes:
        train_bytes: byte budget of each domain's training split (UTF-8 bytes of text).
        heldout_bytes: byte budget of each domain's held-out split.
        heldout_modulus: a file whose path hash is 0 modulo this goes to the held-out split.
        max_file_bytes: a file's text (a rendered page, a catalog's strings) is cut at the last line end
            before this many bytes.
    """

    train_bytes: int = 4_000_000
    heldout_bytes: int = 400_000
    heldout_modulus: int = 10
    max_file_bytes: int = 262_144

    def validate(self) -> None:
        """Raises ValueError naming the first field out of range."""
        if self.train_bytes <= 0:
            raise ValueError(f"train_bytes must be positive, got {self.train_bytes}")
        if self.heldout_bytes <= 0:
            raise ValueError(f"heldout_bytes must be positive, got {self.heldout_bytes}")
        if self.heldout_modulus < 2:
            raise ValueError(f"heldout_modulus must be at least 2, got {self.heldout_modulus}")
        if self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes must be positive, got {self.max_file_bytes}")


@dataclass(frozen=True)
class Document:
    """One file's text; `path` is where it came from (absolute)."""

    path: str
    text: str


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's text comes from and how a file becomes text.

    Attributes:
        name: the domain name (one of DOMAINS).
        description: one line for the manifest and the model card.
        roots: directories searched; each must exist.
        provider: what to install when a root or tool is missing.
        list_files: returns the candidate files (any order; the builder orders them).
        read: returns a file's text, or None to skip the file.
        tools: executables the reader needs.
    """

    name: str
    description: str
    roots: tuple[str, ...]
    provider: str
    list_files: Callable[[], list[Path]]
    read: Callable[[Path], str | None]
    tools: tuple[str, ...] = ()


class CorpusSourceError(RuntimeError):
    """A domain's source directory or tool is missing on this machine."""


def _path_hash(path: Path) -> int:
    return int.from_bytes(hashlib.sha1(str(path).encode("utf-8")).digest()[:8], "big")


def _walk(root: str, accept: Callable[[Path], bool], skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for filename in filenames:
            path = Path(directory) / filename
            if not path.is_symlink() and path.is_file() and accept(path):
                found.append(path)
    return found


def _normalise(text: str) -> str:
    """CRLF to LF, trailing spaces dropped, runs of blank lines cut to one, one final newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line == "" and out and out[-1] == "":
            continue
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def _read_source(path: Path) -> str | None:
    try:
        return _normalise(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _read_javascript(path: Path) -> str | None:
    text = _read_source(path)
    if text is None or any(len(line) > _MAX_JS_LINE for line in text.split("\n")):
        return None
    return text


def _man_source_is_stub(path: Path) -> bool:
    """True for pages that only include another one (`.so other.1`)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return True
    return head.lstrip().startswith(b".so ")


def _render_man(path: Path) -> str | None:
    """The page as plain UTF-8 text, as `man` prints it into a pipe (no bold or underline)."""
    if _man_source_is_stub(path):
        return None
    env = {**os.environ, **_MAN_ENV}
    env.pop("MAN_KEEP_FORMATTING", None)
    result = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], env=env, capture_output=True, timeout=120, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    try:
        return _normalise(result.stdout.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def read_mo_strings(path: Path) -> list[str]:
    """The translated strings of a GNU gettext catalog (`.mo`), in catalog order.

    The header entry (empty msgid) is left out; plural forms come as separate strings.

    Raises:
        ValueError: the file is not a `.mo` catalog.
    """
    data = path.read_bytes()
    if len(data) < 28:
        raise ValueError(f"'{path}' is too short for a .mo catalog")
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if endian is None:
        raise ValueError(f"'{path}' is not a .mo catalog (magic {magic:#x})")
    n_strings, off_orig, off_trans = struct.unpack(endian + "III", data[8:20])
    strings: list[str] = []
    for i in range(n_strings):
        orig_len, _ = struct.unpack(endian + "II", data[off_orig + 8 * i : off_orig + 8 * i + 8])
        trans_len, trans_off = struct.unpack(endian + "II", data[off_trans + 8 * i : off_trans + 8 * i + 8])
        if orig_len == 0:
            continue  # the header
        raw = data[trans_off : trans_off + trans_len]
        for part in raw.split(b"\0"):
            try:
                text = part.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text:
                strings.append(text)
    return strings


def _read_translated(path: Path) -> str | None:
    """A gettext catalog's translated strings, or a rendered man page (the German and French readers)."""
    if path.suffix == ".mo":
        try:
            strings = read_mo_strings(path)
        except ValueError:
            return None
        return _normalise("\n".join(strings)) if strings else None
    return _render_man(path)


def _python_stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def default_sources() -> dict[str, DomainSource]:
    """Every known domain's source on a Debian-like machine, keyed by domain name."""
    stdlib = _python_stdlib()
    man_sections = tuple(f"/usr/share/man/man{s}" for s in (1, 5, 7, 8))
    german_roots = ("/usr/share/man/de", "/usr/share/locale/de/LC_MESSAGES")
    french_roots = ("/usr/share/man/fr", "/usr/share/locale/fr/LC_MESSAGES")

    def python_files() -> list[Path]:
        return _walk(stdlib, lambda p: p.suffix == ".py", frozenset({"site-packages", "dist-packages", "__pycache__"}))

    def c_files() -> list[Path]:
        return _walk("/usr/include", lambda p: p.suffix == ".h")

    def js_files() -> list[Path]:
        return _walk("/usr/lib/node_modules", lambda p: p.suffix in {".js", ".mjs", ".cjs"} and not p.name.endswith(".min.js"))

    def english_files() -> list[Path]:
        return [p for root in man_sections for p in _walk(root, lambda p: True)]

    def translated_files(roots: tuple[str, str]) -> Callable[[], list[Path]]:
        def files() -> list[Path]:
            pages = _walk(roots[0], lambda p: True)
            catalogs = _walk(roots[1], lambda p: p.suffix == ".mo" and not _ISO_CATALOG.match(p.name))
            return pages + catalogs
        return files

    def cpp_files() -> list[Path]:
        return _walk("/usr/include/c++", lambda p: p.suffix != ".h")

    def perl_files() -> list[Path]:
        return _walk("/usr/share/perl", lambda p: p.suffix in {".pm", ".pl"})

    return {
        "python": DomainSource("python", f"Python standard library sources ({stdlib}, no site-packages)", (stdlib,),
                               "a CPython installation with its standard library", python_files, _read_source),
        "c": DomainSource("c", "C headers (/usr/include/**/*.h)", ("/usr/include",),
                          "libc6-dev / linux-libc-dev (apt-get install build-essential)", c_files, _read_source),
        "javascript": DomainSource("javascript", "npm's JavaScript sources (/usr/lib/node_modules, no *.min.js, no line over "
                                   f"{_MAX_JS_LINE} chars)", ("/usr/lib/node_modules",), "nodejs with npm (apt-get install npm)",
                                   js_files, _read_javascript),
        "english": DomainSource("english", "English man pages, sections 1, 5, 7, 8, rendered by man (80 columns, no hyphenation "
                                "or justification)", man_sections, "man-db, groff-base and manpages (apt-get install man-db "
                                "manpages)", english_files, _render_man, ("man",)),
        "german": DomainSource("german", "German man pages (/usr/share/man/de, rendered by man) and the translated strings of "
                               "German gettext catalogs (/usr/share/locale/de/LC_MESSAGES/*.mo, no iso_* lists)", german_roots,
                               "manpages-de and German translations (apt-get install manpages-de locales-all, or packages "
                               "shipping de catalogs)", translated_files(german_roots), _read_translated, ("man",)),
        "cpp": DomainSource("cpp", "C++ standard library headers (/usr/include/c++, files without a .h suffix: <vector>, "
                            "*.tcc, *.hpp)", ("/usr/include/c++",), "libstdc++-dev (apt-get install g++)", cpp_files,
                            _read_source),
        "perl": DomainSource("perl", "Perl core library modules and scripts (/usr/share/perl/**/*.pm, *.pl, POD included)",
                             ("/usr/share/perl",), "perl-modules (apt-get install perl)", perl_files, _read_source),
        "french": DomainSource("french", "French man pages (/usr/share/man/fr, rendered by man) and the translated strings of "
                               "French gettext catalogs (/usr/share/locale/fr/LC_MESSAGES/*.mo, no iso_* lists)", french_roots,
                               "manpages-fr and French translations (apt-get install manpages-fr, or packages shipping fr "
                               "catalogs)", translated_files(french_roots), _read_translated, ("man",)),
    }


def check_source(source: DomainSource) -> None:
    """Raises CorpusSourceError naming the missing directory or tool and what provides it."""
    for root in source.roots:
        if not os.path.isdir(root):
            raise CorpusSourceError(f"domain '{source.name}' needs the directory {root} (provided by {source.provider})")
    for tool in source.tools:
        if shutil.which(tool) is None:
            raise CorpusSourceError(f"domain '{source.name}' needs the program '{tool}' on PATH (provided by {source.provider})")


def _cut(text: str, max_bytes: int) -> str:
    """The lines of `text` that fit in `max_bytes` UTF-8 bytes (the whole text when it fits)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    end = data.rfind(b"\n", 0, max_bytes)
    return data[: end + 1].decode("utf-8", errors="ignore") if end > 0 else ""


def _take(ordered: Iterable[Path], read: Callable[[Path], str | None], budget: int, max_file_bytes: int) -> Iterator[Document]:
    used = 0
    for path in ordered:
        if used >= budget:
            return
        text = read(path)
        if text is None:
            continue
        text = _cut(text, max_file_bytes)
        size = len(text.encode("utf-8"))
        if size < 64:
            continue
        used += size
        yield Document(str(path), text)


@dataclass(frozen=True)
class SplitStats:
    """What one split of one domain holds."""

    files: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DomainStats:
    """Manifest entry of one domain."""

    description: str
    candidates: int
    train: SplitStats
    heldout: SplitStats


def _write_split(path: Path, documents: Iterable[Document]) -> SplitStats:
    digest = hashlib.sha256()
    n_files = n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            line = json.dumps({"path": doc.path, "text": doc.text}, ensure_ascii=False)
            f.write(line + "\n")
            digest.update(doc.text.encode("utf-8"))
            n_files += 1
            n_bytes += len(doc.text.encode("utf-8"))
    return SplitStats(n_files, n_bytes, digest.hexdigest())


def build_domain(source: DomainSource, config: CorpusConfig, corpus_dir: Path) -> DomainStats:
    """Writes one domain's two splits and returns its manifest entry.

    Raises:
        CorpusSourceError: the source is missing, or it yields no text for a split.
    """
    check_source(source)
    candidates = sorted(source.list_files(), key=lambda p: (_path_hash(p), str(p)))
    heldout = [p for p in candidates if _path_hash(p) % config.heldout_modulus == 0]
    train = [p for p in candidates if _path_hash(p) % config.heldout_modulus != 0]
    stats = {}
    for split, paths, budget in (("train", train, config.train_bytes), ("heldout", heldout, config.heldout_bytes)):
        stats[split] = _write_split(corpus_dir / f"{source.name}.{split}.jsonl",
                                    _take(paths, source.read, budget, config.max_file_bytes))
        if stats[split].files == 0:
            raise CorpusSourceError(f"domain '{source.name}' has no usable {split} text under {', '.join(source.roots)}")
    return DomainStats(source.description, len(candidates), stats["train"], stats["heldout"])


def build_corpus(out_dir: Path, config: CorpusConfig = CorpusConfig(),
                 log: Callable[[str], None] = print, domains: tuple[str, ...] = DOMAINS) -> dict[str, DomainStats]:
    """Builds the given domains under `out_dir/corpus/` and writes the manifest.

    Args:
        out_dir: the work directory.
        config: byte budgets and the split rule.
        log: receives one line per finished domain.
        domains: the domains, in the order the manifest (and so every report) lists them.

    Returns:
        The manifest entries, keyed by domain.

    Raises:
        ValueError: a domain is unknown, repeated, or none is given.
    """
    config.validate()
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct and at least one, got {domains}")
    corpus_dir = out_dir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    sources = default_sources()
    unknown = [name for name in domains if name not in sources]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {', '.join(sources)}")
    for name in domains:  # fail before any slow rendering when something is missing
        check_source(sources[name])
    manifest: dict[str, DomainStats] = {}
    for name in domains:
        manifest[name] = build_domain(sources[name], config, corpus_dir)
        s = manifest[name]
        log(f"corpus {name}: train {s.train.files} files {s.train.bytes} B, held-out {s.heldout.files} files "
            f"{s.heldout.bytes} B (of {s.candidates} candidates)")
    with open(corpus_dir / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({"config": asdict(config), "domains": {k: asdict(v) for k, v in manifest.items()}}, f, indent=2)
        f.write("\n")
    return manifest


def read_documents(out_dir: Path, domain: str, split: str) -> list[Document]:
    """The documents of one split ("train" or "heldout") of one domain, in corpus order.

    Raises:
        FileNotFoundError: the corpus has not been built under `out_dir`.
    """
    path = out_dir / "corpus" / f"{domain}.{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no corpus split at {path}: run `python -m cluster.train corpus --out {out_dir}` first")
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def read_manifest(out_dir: Path) -> dict:
    """The corpus manifest written by build_corpus."""
    with open(out_dir / "corpus" / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def corpus_domains(out_dir: Path) -> tuple[str, ...]:
    """The domains of the corpus built under `out_dir` (the work directory), in manifest order.

    Raises:
        FileNotFoundError: no corpus has been built there.
    """
    path = out_dir / "corpus" / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no corpus manifest at {path}: run `python -m cluster.train corpus` first")
    return tuple(read_manifest(out_dir)["domains"])
