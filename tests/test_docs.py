"""The documentation a user gets: every page link resolves inside the repository, nothing points outside it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_of_a_page_names_a_file_of_the_repository(page):
    targets = [target for target in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in target]
    missing = [target for target in targets if not (page.parent / target).resolve().exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_nothing_the_user_gets_points_into_the_development_folder_shared():
    shipped = [*PAGES, *ROOT.glob("recipes/*.toml"), *ROOT.glob("replicate/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in shipped
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(^|[\s`(])(\.\./)?shared/", line)
    ]
    assert not offenders, f"paths into shared/, which users do not have: {offenders}"
