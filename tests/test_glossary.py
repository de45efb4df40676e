"""Every method and every paper-based analysis links to its paper; the glossary explains the plots' symbols."""

from __future__ import annotations

import re

from analysis import analyses
from merging import methods
from webapp.ui import glossary


def test_every_method_and_analysis_links_a_paper():
    for name in methods.names():
        link = glossary.paper_link(name)
        assert re.fullmatch(r"\[[^\]]+\]\(https://arxiv\.org/abs/\d{4}\.\d{5}\)", link), (name, link)
    for name in analyses.names():
        if name != "changes":  # the change map is the lab's own view, from no paper
            assert "https://arxiv.org/abs/" in glossary.analysis_links(name), name


def test_glossary_names_the_jargon_the_plots_use():
    text = glossary.markdown()
    for term in ("τ_v", "ΣS_v / ΣS_r", "subspace similarity", "γ (gamma)", "β", "BR2V", "FRANK", "DRIFT",
                 "adaptive_cosine", "relative norm change"):
        assert term in text, term
