"""Make the published asv dashboard (``.asv/html``) render without internet access.

asv's ``index.html`` loads jQuery, flot, bootstrap, stupidtable and blueimp-md5 from CDNs; on a machine that cannot
reach them the page shows only "One or more external (JavaScript) dependencies ... failed to load". This fetches
the same packages with npm (``npm pack``, kept in ``.asv/vendor``), copies the files into ``.asv/html/vendor`` and
points the page at them. Run after ``asv publish``:

    uv run asv publish && uv run python -m bench.offline_html
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTML, CACHE = ROOT / ".asv" / "html", ROOT / ".asv" / "vendor"
# The end of each CDN URL in asv's index.html -> (npm package@version, file inside the package).
FILES = {
    "jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "flot/0.8.3/jquery.flot.min.js": ("flot@0.8.3", "jquery.flot.js"),
    "jquery.flot.time.min.js": ("flot@0.8.3", "jquery.flot.time.js"),
    "jquery.flot.selection.min.js": ("flot@0.8.3", "jquery.flot.selection.js"),
    "jquery.flot.categories.min.js": ("flot@0.8.3", "jquery.flot.categories.js"),
    "jquery.flot.orderBars.js": ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "stupidtable.min.js": ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "md5.min.js": ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "bootstrap.min.js": ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "bootstrap.min.css": ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
FONTS = ("bootstrap@3.1.1", "dist/fonts")  # bootstrap.min.css reads ../fonts/glyphicons-*


def package_dir(spec: str) -> Path:
    """The unpacked npm package ``spec`` (name@version) under `CACHE`, fetched with ``npm pack`` once."""
    out = CACHE / spec
    if not out.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        tgz = subprocess.run(["npm", "pack", "--silent", spec], cwd=CACHE, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(CACHE / tgz) as tar:
            tar.extractall(out, filter="data")
    return out / "package"


def main() -> int:
    index = HTML / "index.html"
    if not index.is_file():
        print(f"no {index}: run `uv run asv publish` first", file=sys.stderr)
        return 1
    vendor = HTML / "vendor"
    vendor.mkdir(exist_ok=True)
    page = index.read_text()
    for tail, (spec, path) in FILES.items():
        shutil.copyfile(package_dir(spec) / path, vendor / Path(path).name)
        tag = re.compile(r'(src|href)="https://[^"]*' + re.escape(tail) + r'"[^>]*?(/?>)')
        page, n = tag.subn(lambda m, p=path: f'{m.group(1)}="vendor/{Path(p).name}"{m.group(2)}', page)
        if n != 1:
            print(f"index.html: expected one reference to {tail}, found {n}", file=sys.stderr)
            return 1
    shutil.copytree(package_dir(FONTS[0]) / FONTS[1], HTML / "fonts", dirs_exist_ok=True)
    index.write_text(page)
    print(f"{index}: {len(FILES)} CDN files replaced by local copies in {vendor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
