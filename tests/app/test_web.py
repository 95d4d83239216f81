"""The web page in a real headless browser: Debian's chromium + chromium-driver, driven by selenium.

Nothing here downloads a browser or a driver: both come from the system (``.ci/run`` installs them with
apt-get). The test is skipped, loudly, only when they are not installed at all.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import requests

from image_search_client import ImageSearchClient
from tests.app.conftest import API_KEY, PREFIX
from tests.images import encode, pattern

pytestmark = pytest.mark.ray

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
]
WAIT_S = 30


def find_chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    found = find_chromium()
    if found is None:
        pytest.skip(
            "BROWSER TEST NOT RUN: chromium and chromedriver are not installed "
            "(apt-get install -y chromium chromium-driver; .ci/run does this)"
        )
    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit driver path: selenium never runs its manager (which would try to download one).
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def web_library(base_url: str) -> Iterator[str]:
    """Four stored images with tags, and one added with save_image: false (no frame to show)."""
    sdk = ImageSearchClient(base_url, api_key=API_KEY)
    name = "web_shop"
    sdk.create_library(name, description="for the browser test")
    colours = {"red1": "red", "blue1": "blue", "red2": "red", "green1": "green"}
    for seed, (image_id, colour) in enumerate(colours.items(), start=31):
        sdk.add_image(
            name,
            image_id,
            f"https://cdn.example.com/{image_id}.png",
            encode(pattern(seed)),
            tags={"color": colour},
        )
    sdk.add_image(
        name,
        "nosave",
        "https://cdn.example.com/nosave.png",
        encode(pattern(40)),
        tags={"color": "red"},
        save_image=False,
    )
    yield name
    sdk.delete_library(name)


def wait_for(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        page = {k: driver.find_element(By.ID, k).text for k in ("status", "error", "library-info")}
        logs = driver.get_log("browser")
        raise AssertionError(f"timed out waiting for {what}; page: {page}; browser log: {logs}") from None


#: Reads the result grid in one script call, so a re-render cannot leave half-read (stale) elements.
READ_GRID = """
return Array.from(document.querySelectorAll('#results .result')).map((c) => ({
  id: c.dataset.imageId,
  score: parseFloat(c.querySelector('.score').textContent),
  img: c.querySelector('img.thumb') !== null,
  link: Array.from(c.querySelectorAll('.no-frame a')).map((a) => a.href),
  tags: Array.from(c.querySelectorAll('.tags li')).map((li) => li.textContent),
}));
"""


def results(driver) -> list[dict[str, object]]:
    return driver.execute_script(READ_GRID)


def wait_for_status(driver, fragment: str) -> None:
    wait_for(driver, lambda d: fragment in d.find_element(By.ID, "status").text, f"status {fragment!r}")


def test_page_and_static_files_load_without_a_key(base_url):
    page = requests.get(base_url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Image Search</title>" in page.text
    for asset, kind in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        r = requests.get(base_url + asset, timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    assert requests.get(base_url + "/static/missing.js", timeout=30).json()["status"] == "NOT_FOUND"
    # the API itself still wants the key
    assert requests.get(base_url + PREFIX + "/library/list", timeout=30).status_code == 401


def test_search_page(browser, base_url, web_library, tmp_path):
    d = browser
    d.get(base_url + "/")
    # No key stored yet: the library list is refused and the envelope's error is shown.
    wait_for(d, lambda d: d.find_element(By.ID, "error").is_displayed(), "the UNAUTHORIZED banner")
    assert d.find_element(By.CSS_SELECTOR, "#error .error-status").text == "UNAUTHORIZED"
    assert "HTTP 401" in d.find_element(By.ID, "error").text

    d.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.ENTER)
    wait_for(
        d, lambda d: d.find_elements(By.CSS_SELECTOR, f"#library option[value='{web_library}']"), "libraries"
    )
    assert not d.find_element(By.ID, "error").is_displayed()
    Select(d.find_element(By.ID, "library")).select_by_value(web_library)
    assert "5 images" in d.find_element(By.ID, "library-info").text

    # Text search: every image comes back (top_k 24 > 5), best first, frames as thumbnails.
    d.find_element(By.ID, "query-text").send_keys("a red shirt", Keys.ENTER)
    wait_for_status(d, "5 results for “a red shirt”")
    grid = results(d)
    assert sorted(r["id"] for r in grid) == ["blue1", "green1", "nosave", "red1", "red2"]
    assert [r["score"] for r in grid] == sorted((r["score"] for r in grid), reverse=True)
    by_id = {r["id"]: r for r in grid}
    assert by_id["red1"]["img"] and by_id["red1"]["tags"] == ["color: red"]
    assert not by_id["nosave"]["img"] and by_id["nosave"]["link"] == ["https://cdn.example.com/nosave.png"]

    # Image search with a file chosen in the file input: the exact duplicate comes first.
    query = tmp_path / "query.png"
    query.write_bytes(encode(pattern(33)))  # the pixels of red2
    d.find_element(By.ID, "image-file").send_keys(str(query))
    wait_for_status(d, "results like query.png")
    grid = results(d)
    assert grid[0]["id"] == "red2" and grid[0]["score"] >= 0.99, grid
    assert d.find_element(By.ID, "query-preview").is_displayed()

    # A tag filter built with the row editor, applied to the same image query.
    d.find_element(By.ID, "add-filter").click()
    row = d.find_element(By.CSS_SELECTOR, "#filter-rows .filter-row")
    row.find_element(By.CSS_SELECTOR, ".f-field").send_keys("color")
    Select(row.find_element(By.CSS_SELECTOR, ".f-op")).select_by_visible_text("in")
    row.find_element(By.CSS_SELECTOR, ".f-value").send_keys("blue, green")
    assert '"op": "in"' in d.find_element(By.ID, "filter-json").get_attribute("textContent")
    d.find_element(By.ID, "apply-filter").click()
    wait_for(d, lambda d: sorted(r["id"] for r in results(d)) == ["blue1", "green1"], "the filtered grid")

    # Clicking a result searches by its id: it comes back first with score 1.
    d.find_element(By.CSS_SELECTOR, "#results .result[data-image-id='green1']").click()
    wait_for_status(d, "results like green1")
    grid = results(d)
    assert grid[0]["id"] == "green1" and grid[0]["score"] == 1.0
    assert {r["id"] for r in grid} <= {"blue1", "green1"}  # the filter still applies

    # A filter the service rejects: its envelope error is shown, the grid is cleared.
    Select(row.find_element(By.CSS_SELECTOR, ".f-op")).select_by_visible_text(">")
    Select(row.find_element(By.CSS_SELECTOR, ".f-type")).select_by_value("boolean")
    row.find_element(By.CSS_SELECTOR, ".f-value").clear()
    row.find_element(By.CSS_SELECTOR, ".f-value").send_keys("true")
    d.find_element(By.ID, "apply-filter").click()
    wait_for(d, lambda d: d.find_element(By.ID, "error").is_displayed(), "the INVALID_PARAMETER banner")
    error = d.find_element(By.ID, "error").text
    assert "INVALID_PARAMETER" in error and "HTTP 400" in error and "tag_filter" in error
    assert results(d) == []
