"""The playground at /ui, driven in Debian's Chromium (headless) as a user would: a key, a
prompt, the progress bar moving, the image at its pixel size, the gallery and its details,
a canceled job, and refusals shown as text. Skips where no chromedriver is installed."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

Key = Callable[..., str]

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")
NO_BROWSER = "no headless browser: apt-get install chromium chromium-driver"
WAIT = 60
TIMES = "\N{MULTIPLICATION SIGN}"  # the page writes sizes as 128 TIMES 96


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if CHROMEDRIVER is None or CHROMIUM is None:
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # the system browser: Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


def wait(driver: Any, check: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(check, what)


def text(driver: Any, element_id: str) -> str:
    value: str = driver.find_element("id", element_id).text
    return value


def open_ui(driver: Any, api_url: str, key: str) -> None:
    """The page, fresh, with ``key`` typed in and used."""
    driver.get(f"{api_url}/ui")
    driver.execute_script("localStorage.clear()")
    driver.get(f"{api_url}/ui")
    field = driver.find_element("id", "key")
    field.send_keys(key)
    driver.find_element("css selector", "#key-form button[type=submit]").click()


def wait_for_account(driver: Any, credits: int) -> None:
    wait(driver, lambda d: text(d, "credits") == f"Credits left: {credits}", "the credits shown")
    wait(driver, lambda d: d.find_elements("css selector", "#tier option"), "the tiers")


def fill(driver: Any, **fields: str) -> None:
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        element = driver.find_element("id", name)
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)


def image_size(driver: Any, selector: str) -> tuple[int, int] | None:
    """The natural size of a loaded image, None while it loads."""
    size = driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight]"
        " : null;",
        selector,
    )
    return None if size is None else (int(size[0]), int(size[1]))


def policy_violations(driver: Any) -> list[str]:
    """What the browser's console said about the page's own scripts failing or the CSP."""
    logs = driver.get_log("browser")
    return [
        entry["message"]
        for entry in logs
        if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]
    ]


def screenshot(driver: Any, path: Path) -> Path:
    """The whole page, not just the window: the window grown to the page's height."""
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], height + 150))
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    return path


WATCH_PROGRESS = """
const bar = document.getElementById("progress");
window.seen = [];
new MutationObserver(() => window.seen.push([Number(bar.value), Number(bar.max)]))
  .observe(bar, {attributes: true});
"""


def test_a_prompt_renders_with_progress_and_lands_in_the_gallery(
    driver: Any, api_url: str, new_key: Key, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    open_ui(driver, api_url, new_key(10))
    wait_for_account(driver, 10)
    prompt = "a lighthouse at dusk, oil on canvas"
    fill(
        driver,
        tier="budget",
        prompt=prompt,
        width="128",
        height="96",
        steps="24",
        seed="1234",
    )
    driver.execute_script(WATCH_PROGRESS)
    driver.find_element("id", "submit").click()

    wait(driver, lambda d: image_size(d, "#result img"), "the image", timeout=90)
    assert image_size(driver, "#result img") == (128, 96)
    assert text(driver, "status") == "Job succeeded"
    seen = driver.execute_script("return window.seen")
    assert any(0 < value < top for value, top in seen), seen  # it moved, step by step
    assert seen[-1] == [24, 24], seen
    caption = text(driver, "result")
    assert f"Seed 1234, 128{TIMES}96 px." in caption
    link = driver.find_element("link text", "Download image")
    image_url = driver.find_element("css selector", "#result img").get_attribute("src")
    assert link.get_attribute("href") == image_url
    assert httpx.get(image_url).content[:3] == b"\xff\xd8\xff"  # the JPEG the link downloads
    wait(driver, lambda d: text(d, "credits") == "Credits left: 9", "the credits after")

    thumb = f"#gallery img[alt='succeeded: {prompt}']"
    wait(driver, lambda d: image_size(d, thumb), "the thumbnail")
    assert image_size(driver, thumb) == (128, 96)
    shot = screenshot(driver, tmp_path / "ui-playground.png")
    print(f"screenshot of the playground: {shot}")

    # Keyboard only: focus the thumbnail, open its details, close them with Escape.
    button = driver.find_element("css selector", "#gallery button.thumb")
    driver.execute_script("arguments[0].focus()", button)
    button.send_keys(Keys.ENTER)
    dialog = driver.find_element("id", "details")
    wait(driver, lambda d: dialog.is_displayed(), "the details")
    shown = dialog.text
    for expected in (prompt, "succeeded", "1234", f"128{TIMES}96 px", "1 credit\n", "budget"):
        assert expected in shown, shown
    screenshot(driver, tmp_path / "ui-details.png")
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(driver, lambda d: not dialog.is_displayed(), "the details closed")
    assert policy_violations(driver) == []


def test_a_running_job_is_canceled_from_the_page(
    driver: Any, api_url: str, new_key: Key, tmp_path: Path
) -> None:
    key = new_key(10)
    open_ui(driver, api_url, key)
    wait_for_account(driver, 10)
    # The model's own size (1024 px) and the normal tier's most steps: slow on a CPU.
    fill(driver, tier="normal", prompt="a slow one", steps="50")
    driver.find_element("id", "submit").click()
    wait(driver, lambda d: text(d, "status").startswith("Running: step"), "the job running")
    assert text(driver, "credits") == "Credits left: 8"
    driver.find_element("id", "cancel").click()
    wait(driver, lambda d: text(d, "status").startswith("Job canceled"), "the job canceled")
    wait(driver, lambda d: text(d, "credits") == "Credits left: 10", "the refund")
    assert not driver.find_element("id", "cancel").is_displayed()
    jobs = httpx.get(f"{api_url}/v1/jobs", headers={"Authorization": key}).json()["jobs"]
    assert [job["status"] for job in jobs] == ["canceled"]
    step = jobs[0]["progress"]["step"]
    assert step < 50
    wait(driver, lambda d: text(d, "status") == f"Job canceled at step {step} of 50", "where")
    wait(
        driver,
        lambda d: d.find_elements("css selector", "#gallery .placeholder"),
        "the canceled job in the gallery",
    )
    assert text(driver, "gallery") == "canceled: a slow one"
    screenshot(driver, tmp_path / "ui-canceled.png")


def shown_error(driver: Any) -> str:
    return str(wait(driver, lambda d: text(d, "error"), "an error shown"))


def test_refusals_are_shown_as_text(driver: Any, api_url: str, new_key: Key) -> None:
    open_ui(driver, api_url, "sdq_not_a_key")
    refused = httpx.get(f"{api_url}/v1/account", headers={"Authorization": "sdq_not_a_key"})
    assert refused.status_code == 403
    assert shown_error(driver) == f"403 Key refused: {refused.json()['message']}"
    assert driver.find_element("id", "error").get_attribute("role") == "alert"

    broke = new_key(0)
    open_ui(driver, api_url, broke)
    wait_for_account(driver, 0)
    fill(driver, tier="budget", prompt="no credits for this", steps="1")
    driver.find_element("id", "submit").click()
    body = {"prompt": "no credits for this", "tier": "budget", "steps": 1}
    poor = httpx.post(f"{api_url}/v1/jobs", json=body, headers={"Authorization": broke})
    assert poor.status_code == 429 and "not enough credits" in poor.json()["message"]
    assert shown_error(driver) == f"429 Refused: {poor.json()['message']}"
    assert text(driver, "gallery") == "No jobs yet."

    # Forgetting the key empties the field and what it showed, and the next visit.
    driver.find_element("id", "forget").click()
    assert driver.find_element("id", "key").get_attribute("value") == ""
    assert driver.execute_script("return localStorage.length") == 0
    assert text(driver, "credits") == ""


def test_on_a_phone_the_form_is_one_column(driver: Any, api_url: str, new_key: Key) -> None:
    driver.set_window_size(390, 844)
    try:
        open_ui(driver, api_url, new_key(1))
        wait_for_account(driver, 1)
        boxes = driver.execute_script(
            "return ['tier', 'style', 'width', 'height', 'steps'].map((id) =>"
            " document.getElementById(id).getBoundingClientRect().toJSON());"
        )
        assert len({round(box["left"]) for box in boxes}) == 1, boxes  # stacked
        assert all(a["bottom"] <= b["top"] for a, b in pairwise(boxes))
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
    finally:
        driver.set_window_size(1280, 1000)


class Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str | None] = []
        self.inline = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.sources.append(dict(attrs).get("src"))
            self._in_script = True
        if any(name == "style" or name.startswith("on") for name, _ in attrs):
            self.inline += f"<{tag} {attrs}>"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline += data.strip()


def test_the_page_needs_no_key_and_holds_a_strict_policy(api_url: str) -> None:
    page = httpx.get(f"{api_url}/ui")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    parser = Scripts()
    parser.feed(page.text)
    assert parser.sources == ["/ui/app.js"] and parser.inline == ""
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for name, kind in [("app.js", "text/javascript"), ("api.js", "text/javascript")]:
        asset = httpx.get(f"{api_url}/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{api_url}/ui/style.css").headers["content-type"].startswith("text/css")
    missing = httpx.get(f"{api_url}/ui/..%2Fapi%2Fui.py")
    assert missing.status_code == 404 and missing.json()["code"] == 404
    root = httpx.get(f"{api_url}/")
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    spec = httpx.get(f"{api_url}/openapi.json").json()
    assert not [path for path in spec["paths"] if path == "/" or path.startswith("/ui")]
    assert "(/ui)" in spec["info"]["description"]
