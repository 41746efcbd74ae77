"""Data docs that work offline.

Great Expectations' data docs load Bootstrap, jQuery, Popper, bootstrap-table, Font Awesome and Vega from
CDNs, so on a machine without internet (ours, or a cluster behind a proxy) a validation report shows as
unstyled text. `make install` fetches those exact files once from the npm registry
(`python -m kat_core.data.docs_assets fetch`, which runs `npm pack`), and `localize(docs_dir)`, called when
the validation stage builds its docs, copies the ones a page uses next to the pages (with what their CSS
refers to, e.g. Font Awesome's webfonts) and points the pages at them. A reference with no local copy is
left as it is and named in one log line, so a page still works wherever the CDNs can be reached.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ASSETS_ENV = "KAT_DOCS_ASSETS"
VENDOR = "static/vendor"  # under the docs site's root

# What GX's pages load (great_expectations 1.x templates) -> (npm package@version, file in the package).
# unpkg.com and cdn.jsdelivr.net/npm serve npm packages, so their URLs map by rule; the others are listed.
_LISTED = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": ("bootstrap@4.3.1",
                                                                             "dist/css/bootstrap.min.css"),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": ("bootstrap@4.3.1",
                                                                              "dist/js/bootstrap.min.js"),
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery@3.7.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": ("popper.js@1.12.9",
                                                                                  "dist/umd/popper.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": ("@fortawesome/fontawesome-free@6.6.0",
                                                                                 "css/all.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker@1.9.0", "dist/css/bootstrap-datepicker.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker@1.9.0", "dist/js/bootstrap-datepicker.min.js"),
    # a bare package URL serves the package's browser build
    "https://cdn.jsdelivr.net/npm/vega@5": ("vega@5.33.1", "build/vega.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": ("vega-lite@5.23.0", "build/vega-lite.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": ("vega-embed@6.29.0", "build/vega-embed.min.js"),
}
_NPM_CDN = re.compile(r"^https://(?:unpkg\.com|cdn\.jsdelivr\.net/npm)/((?:@[^/@]+/)?[^/@]+@[^/]+)/(.+)$")
# the tags that load a URL, and the attributes that pin a CDN's copy (a local copy is served without them)
_REF = re.compile(r"""(<(?:link|script)\b[^>]*?\b(?:href|src)=")(https://[^"]+)("[^>]*>)""")
_PINNING = re.compile(r"""\s+(?:integrity|crossorigin)="[^"]*"|\s+crossorigin(?=[\s>/])""")
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+?)['"]?\s*\)""")


def packages() -> list[str]:
    """The npm packages the known references come from."""
    specs = {spec for spec, _ in _LISTED.values()}
    specs |= {"bootstrap-table@1.19.1", "bootstrap-table@1.19.0", "@forevolve/bootstrap-dark@1.1.0"}
    return sorted(specs)


def source_of(url: str) -> tuple[str, str] | None:
    """(npm package@version, path in it) of a CDN URL, or None for a URL we do not know."""
    if url in _LISTED:
        return _LISTED[url]
    m = _NPM_CDN.match(url)
    return (m[1], m[2]) if m else None


def assets_dir() -> Path:
    """Where fetched packages lie: $KAT_DOCS_ASSETS, else the environment's share/kat/docs-assets."""
    return Path(os.environ.get(ASSETS_ENV) or Path(sys.prefix) / "share" / "kat" / "docs-assets")


def _folder(spec: str) -> str:
    return spec.replace("/", "__")


def fetch(dest: Path | None = None, *, say=print) -> int:
    """Fetch every package with `npm pack` into `dest` (one folder per package@version; those present are
    kept). Returns the number fetched; raises RuntimeError when npm is missing or fails."""
    dest = dest or assets_dir()
    npm = shutil.which("npm")
    todo = [s for s in packages() if not (dest / _folder(s) / "package.json").is_file()]
    if todo and npm is None:
        raise RuntimeError("npm is not installed: data docs will load their styles from CDNs")
    dest.mkdir(parents=True, exist_ok=True)
    for spec in todo:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", tmp], capture_output=True,
                               text=True, timeout=300)
            tarballs = list(Path(tmp).glob("*.tgz"))
            if r.returncode != 0 or not tarballs:
                raise RuntimeError(f"npm pack {spec} failed: {(r.stderr or r.stdout).strip()[-300:]}")
            unpacked = Path(tmp) / "unpacked"
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(unpacked, filter="data")
            target = dest / _folder(spec)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(unpacked / "package"), target)  # npm tarballs hold one `package/` folder
        say(f"data docs assets: {spec}")
    return len(todo)


def _copy_with_references(src: Path, dst: Path, root: Path) -> None:
    """Copy a file; for a stylesheet also the files its url(...)s name, relative to it, within the package."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    if src.suffix != ".css":
        return
    for ref in set(_CSS_URL.findall(src.read_text(errors="replace"))):
        if ref.startswith(("data:", "http:", "https:", "//", "#")):
            continue
        rel = ref.split("?")[0].split("#")[0]
        target = (src.parent / rel).resolve()
        if target.is_file() and target.is_relative_to(root.resolve()):
            _copy_with_references(target, (dst.parent / rel).resolve(), root)


def localize(docs_dir: Path, assets: Path | None = None) -> list[str]:
    """Point every page under `docs_dir` at local copies of the CDN files it loads (copied under
    `docs_dir/static/vendor`). Returns the references left on a CDN (no local copy), also logged once."""
    assets = assets or assets_dir()
    docs_dir = Path(docs_dir)
    missing: set[str] = set()
    for page in docs_dir.rglob("*.html"):
        html = page.read_text(encoding="utf-8")

        def local(m: re.Match, page: Path = page) -> str:
            url = m[2]
            source = source_of(url)
            package = assets / _folder(source[0]) if source else None
            if package is None or not (package / source[1]).is_file():
                missing.add(url)
                return m[0]
            copy = docs_dir / VENDOR / _folder(source[0]) / source[1]
            _copy_with_references(package / source[1], copy, package)
            rel = os.path.relpath(copy, page.parent).replace(os.sep, "/")
            return _PINNING.sub("", m[1] + rel + m[3])

        changed = _REF.sub(local, html)
        if changed != html:
            page.write_text(changed, encoding="utf-8")
    if missing:
        log.info("data docs: %d reference(s) still load from a CDN (no local copy; `make install` fetches them "
                 "with npm): %s", len(missing), ", ".join(sorted(missing)))
    return sorted(missing)


def main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"]:
        print("usage: python -m kat_core.data.docs_assets fetch [DIR]\n"
              "Fetch the CDN files of Great Expectations' data docs from the npm registry, so validation reports "
              f"show styled offline (default DIR: ${ASSETS_ENV}, else {assets_dir()}).", file=sys.stderr)
        return 2
    try:
        n = fetch(Path(argv[1]) if len(argv) > 1 else None)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: {e}", file=sys.stderr)
        return 1
    print(f"data docs assets: {n} package(s) fetched into {assets_dir() if len(argv) < 2 else argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
