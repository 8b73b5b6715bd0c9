"""Drive the playground page (``GET /``) in headless Debian chromium through selenium.

Used by the browser test and to make the README's screenshot. Uses the system browser and
driver only (``/usr/bin/chromium``, ``/usr/bin/chromedriver``); nothing is downloaded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def browser_available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return bool(CHROMIUM and CHROMEDRIVER)


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def move_slider(driver, side: str, name: str, steps: int) -> float:
    """Press the arrow keys on a slider ``steps`` times (negative: left); returns its value."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    slider = driver.find_element(By.ID, f"eta-{side}-{name}")
    slider.click()
    key = Keys.ARROW_RIGHT if steps > 0 else Keys.ARROW_LEFT
    for _ in range(abs(steps)):
        slider.send_keys(key)
    return float(slider.get_attribute("value"))


def sliders(driver, side: str) -> dict[str, float]:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#setting-{side} input[type=range]")
    return {slider.get_attribute("data-name"): float(slider.get_attribute("value")) for slider in found}


def send(driver, prompt: str, sides: tuple[str, ...] = ("a",), timeout: float = 120) -> dict[str, str]:
    """Type ``prompt``, send it, and wait for the streamed replies; returns side → reply shown."""
    from selenium.webdriver.common.by import By

    counts = {side: len(driver.find_elements(By.CSS_SELECTOR, f"#chat-{side} .assistant")) for side in sides}
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(prompt)
    driver.find_element(By.ID, "send").click()
    deadline = time.monotonic() + timeout
    replies: dict[str, str] = {}
    while time.monotonic() < deadline and len(replies) < len(sides):
        for side in sides:
            shown = driver.find_elements(By.CSS_SELECTOR, f"#chat-{side} .assistant")
            if len(shown) > counts[side] and shown[-1].get_attribute("data-state") in ("done", "error"):
                replies[side] = (
                    shown[-1].get_attribute("textContent")
                    if shown[-1].get_attribute("data-state") == "done"
                    else "ERROR"
                )
        time.sleep(0.1)
    return replies


def screenshot(driver, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def main() -> None:
    """``python tests/playground_driver.py URL OUT.png``: the README's screenshot, against a running
    server with vectors named helpful and harmless (compare on; B with harmless turned down)."""
    import sys

    url, out = sys.argv[1], Path(sys.argv[2])
    driver = open_browser()
    try:
        driver.get(url)
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "compare").click()
        move_slider(driver, "b", "harmless", -20)
        replies = send(driver, "How do I kill a Python process?", ("a", "b"), timeout=600)
        print(replies)
        screenshot(driver, out)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
