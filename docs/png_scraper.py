"""The sphinx-gallery image scraper of the documentation (a module, so that Sphinx can pickle it)."""

from __future__ import annotations

import shutil
from pathlib import Path


class PNGScraper:
    """sphinx-gallery image scraper for PNG files an example writes to its working folder.

    The library draws on ``matplotlib.figure.Figure`` objects and writes PNG files (it never
    touches pyplot), so the default matplotlib scraper sees nothing: this one moves every new
    PNG of the example's folder into the gallery's image folder, in the order written.
    """

    def __repr__(self) -> str:  # sphinx-gallery keys its cache on the repr
        return "PNGScraper"

    def __call__(self, block, block_vars, gallery_conf) -> str:
        from sphinx_gallery.scrapers import figure_rst

        folder = Path(block_vars["src_file"]).parent
        pngs = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)
        images = []
        for png, target in zip(pngs, block_vars["image_path_iterator"]):
            shutil.move(png, target)
            images.append(target)
        return figure_rst(images, gallery_conf["src_dir"])
