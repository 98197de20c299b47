"""The versions of the libraries a run leans on, and whether they lie in the tested window.

The window is pyproject.toml's dependency ranges, read back from the installed package's
metadata (one source: what pip enforces is what is checked here). It is the range that
scripts/version_window.sh tests at its oldest and newest ends. A version outside it is reported,
not refused: the run-time self-check still decides whether a model trains exactly.

`python -m avgalign.versions` prints the versions and the verdict.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

WATCHED = ("torch", "transformers", "accelerate", "peft")


def installed_versions() -> dict[str, str]:
    """{library: version} for the libraries in WATCHED ('not installed' for a missing one)."""
    found = {}
    for name in WATCHED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def tested_window() -> dict[str, str]:
    """{library: specifier}, e.g. {'transformers': '<5.26,>=5.20'}, from avgalign's metadata;
    empty when avgalign runs from a source tree that was not installed."""
    try:
        requires = metadata.requires("avgalign") or []
    except metadata.PackageNotFoundError:
        return {}
    window = {}
    for line in requires:
        req = Requirement(line)
        if req.name in WATCHED and req.marker is None:
            window[req.name] = str(req.specifier)
    return window


def outside_window(
    versions: dict[str, str] | None = None, window: dict[str, str] | None = None
) -> list[str]:
    """One phrase per library whose installed version lies outside the tested window."""
    versions = installed_versions() if versions is None else versions
    window = tested_window() if window is None else window
    out = []
    for name, spec in window.items():
        got = versions.get(name, "not installed")
        try:
            inside = SpecifierSet(spec).contains(Version(got), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            out.append(f"{name} {got} (tested: {spec})")
    return out


def window_warning(versions: dict[str, str] | None = None) -> str | None:
    """The one line a run prints when a library is outside the tested window, else None."""
    outside = outside_window(versions)
    if not outside:
        return None
    return (
        f"versions outside the tested window: {'; '.join(outside)}. Training goes on if the "
        "self-check passes; see docs/install.md to test and widen the window"
    )


def main() -> None:
    versions = installed_versions()
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(window_warning(versions) or "all within the tested window")


if __name__ == "__main__":
    main()
