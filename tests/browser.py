"""Headless Chromium for tests that use a web UI as a person does: look, click, screenshot.

The browser and its driver are the system's (Debian's ``chromium`` and
``chromium-driver`` packages). Both paths are given to Selenium explicitly,
which makes it skip Selenium Manager: nothing is looked up or downloaded
when a test runs (there is no network to do it with anyway).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1440, 1500)
"""Big enough for a run page's header, graph and a few rows of its tabs without scrolling."""


@contextmanager
def headless_chromium() -> Iterator[WebDriver]:
    """A headless Chromium session for the duration of the block.

    Raises
    ------
    FileNotFoundError
        When the system browser or driver is missing, naming the packages that
        provide them.
    """
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: tests and CI run as root, where Chromium's sandbox refuses to start.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver: WebDriver, text: str, timeout_s: float = 30) -> None:
    """Wait until the page shows ``text``: UIs render what they fetch after the page loads.

    Raises
    ------
    TimeoutError
        Naming the text, the URL and the start of what the page did show.
    """
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        try:
            shown = driver.find_element("tag name", "body").text
        except (StaleElementReferenceException, WebDriverException):
            shown = ""
        if text in shown:
            return
        time.sleep(0.25)
    raise TimeoutError(
        f"{text!r} not shown at {driver.current_url} after {timeout_s} s; "
        f"the page shows: {shown[:500]!r}"
    )


def wait_for_text_gone(driver: WebDriver, text: str, timeout_s: float = 30) -> None:
    """Wait until the page no longer shows ``text`` (a filter has been applied, say).

    Raises
    ------
    TimeoutError
        Naming the text and the URL.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if text not in driver.find_element("tag name", "body").text:
                return
        except (StaleElementReferenceException, WebDriverException):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{text!r} still shown at {driver.current_url} after {timeout_s} s")


def visible(driver: WebDriver, xpath: str, timeout_s: float = 30) -> WebElement:
    """The first displayed element matching ``xpath``, once there is one.

    Raises
    ------
    TimeoutError
        Naming the XPath and the URL.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            shown = [e for e in driver.find_elements("xpath", xpath) if e.is_displayed()]
        except StaleElementReferenceException:
            shown = []
        if shown:
            return shown[0]
        time.sleep(0.25)
    raise TimeoutError(f"nothing displayed matches {xpath} at {driver.current_url}")


def click(driver: WebDriver, xpath: str, timeout_s: float = 30) -> None:
    """Click the first displayed element matching ``xpath``, as a pointer would.

    An element can be displayed yet covered for a moment (a menu still
    animating in), and re-rendering can replace it: both are retried until
    the deadline, then raised.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        element = visible(driver, xpath, max(deadline - time.monotonic(), 0.5))
        try:
            element.click()
            return
        except (ElementClickInterceptedException, StaleElementReferenceException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def screenshot(driver: WebDriver, path: Path) -> Path:
    """Save what the window shows as a PNG at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise OSError(f"Chromium could not write the screenshot {path}")
    return path
