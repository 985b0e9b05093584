"""The configs shipped with selfkd, addressable by name from any install.

The package holds them as ``selfkd/configs/`` (in a checkout a link to the top-level
``configs/`` folder, so there is one copy). A name is the path below that folder without
``.yaml``: ``selfkd train -c fashion_mnist/ce``, ``selfkd sweep paper/aikd/table2_3_cifar100``.
A path to an existing file always wins over a name. ``selfkd configs list`` prints the names;
``selfkd configs copy NAME... --to DIR`` copies configs (and the files they are based on) to
edit them.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import yaml

from selfkd.errors import ConfigError

SUFFIX = ".yaml"


def configs_root() -> Path | None:
    """The folder of the shipped configs (None if this install has none)."""
    root = Path(str(resources.files("selfkd"))) / "configs"
    if root.is_dir():
        return root
    checkout = Path(__file__).resolve().parents[2] / "configs"  # a source tree without the link
    return checkout if checkout.is_dir() else None


def list_configs() -> list[str]:
    """Every shipped config's name (``_``-prefixed bases included), sorted."""
    root = configs_root()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{SUFFIX}"))


def shipped_path(name: str) -> Path | None:
    """The file of shipped config ``name`` (with or without ``.yaml``), or None."""
    root = configs_root()
    if root is None or not name or Path(name).is_absolute():
        return None
    clean = name.removeprefix("configs/")
    candidate = (root / clean).with_suffix(SUFFIX) if not clean.endswith(SUFFIX) else root / clean
    try:
        candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return None  # ../ out of the folder
    return candidate if candidate.is_file() else None


def resolve_config(path: str | Path, what: str = "config") -> Path:
    """``path`` when it is a file, else the shipped config of that name; ConfigError if neither."""
    path = Path(path)
    if path.is_file():
        return path
    found = shipped_path(str(path).replace("\\", "/"))
    if found is not None:
        return found
    raise ConfigError(
        f"{what} file not found: {path} (nor a shipped config of that name; "
        "`selfkd configs list` shows them)"
    )


def is_sweep(data: object) -> bool:
    """Whether a parsed YAML file is a sweep (``grid:`` or ``runs:``) rather than a config."""
    return isinstance(data, dict) and ("grid" in data or "runs" in data)


def describe_config(name: str) -> tuple[str, str]:
    """(kind, first comment line) of shipped config ``name``; kind is config, sweep or base
    (``_``-prefixed files and ``base/`` folders hold what others build on)."""
    path = shipped_path(name)
    if path is None:
        raise ConfigError(f"no shipped config named {name!r}; `selfkd configs list` shows them")
    text = path.read_text()
    about = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    try:
        sweep = is_sweep(yaml.safe_load(text))
    except yaml.YAMLError:
        sweep = False
    parts = name.split("/")
    kind = (
        "sweep" if sweep else "base" if parts[-1].startswith("_") or "base" in parts else "config"
    )
    return kind, about


def _with_bases(path: Path, root: Path) -> list[Path]:
    """``path`` and, transitively, every shipped file its ``base:`` names."""
    found: list[Path] = []
    while path not in found:
        found.append(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            break
        base = data.get("base") if isinstance(data, dict) else None
        if not isinstance(base, str):
            break
        path = (path.parent / base).resolve()
        try:
            path.relative_to(root.resolve())
        except ValueError:
            break
        if not path.is_file():
            break
    return found


def copy_configs(names: list[str], dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy shipped configs (a name, a folder name such as ``paper/aikd``, or all when
    ``names`` is empty) with the files they are based on into ``dest``, keeping their layout
    (so ``base:`` paths still work). Refuses to replace files unless ``overwrite``."""
    root = configs_root()
    if root is None:
        raise ConfigError("this selfkd install ships no configs; reinstall selfkd")
    real = root.resolve()
    sources: list[Path] = []
    for name in names or [""]:
        folder = real / name.removeprefix("configs/").strip("/")
        file = shipped_path(name) if name else None
        if file is not None:
            picked = [file.resolve()]
        elif folder.is_dir() and folder.resolve().is_relative_to(real):
            picked = sorted(folder.rglob(f"*{SUFFIX}"))
        else:
            raise ConfigError(
                f"no shipped config or folder named {name!r}; `selfkd configs list` shows them"
            )
        for path in picked:
            for needed in _with_bases(path.resolve(), real):
                if needed not in sources:
                    sources.append(needed)
    dest = Path(dest)
    targets = [dest / p.relative_to(real) for p in sources]
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        raise ConfigError(f"{clash[0]} already exists; pass --overwrite or choose another --to")
    for source, target in zip(sources, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return targets
