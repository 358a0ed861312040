"""Headless Chromium for the web page's tests: the distribution's `chromium` and `chromedriver` (`make browser`
installs them), driven by selenium. A missing browser fails the test with the reason; nothing is downloaded."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def start_browser() -> Any:
    """A headless Chromium session; pytest.fail (not skip) when selenium or the browser is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.fail(f"selenium is not installed ({exc}): pip install -e '.[dev]'")
    binary, driver = _which(BROWSER_NAMES), _which(DRIVER_NAMES)
    if binary is None or driver is None:
        pytest.fail(f"no headless browser: chromium={binary}, chromedriver={driver}; run `make browser` "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    # selenium's own driver lookup (Selenium Manager) may download one: the path is given so it never does.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    """A PNG of the window under `folder`; fails if it is blank (one colour, or nearly: no variance)."""
    from PIL import Image, ImageStat

    png = driver.get_screenshot_as_png()
    path = folder / f"{name}.png"
    path.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("L")
    variance = ImageStat.Stat(image).var[0]
    colours = image.getcolors(maxcolors=1 << 16)
    assert variance > 100 and (colours is None or len(colours) > 8), f"{path} looks blank (variance {variance:.1f})"
    return path


def foreign_requests(driver: Any, origin: str) -> list[str]:
    """Resources the page loaded (or asked for) from anywhere but `origin` (data: URLs aside)."""
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not n.startswith(origin + "/") and not n.startswith("data:")]


def dom_content_loaded_ms(driver: Any) -> float:
    """Navigation start to DOMContentLoaded, from the Navigation Timing entry."""
    return float(driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0]; return n.domContentLoadedEventEnd - n.startTime;"
    ))  # fmt: skip
