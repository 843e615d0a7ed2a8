"""The storefront in a real browser against `make up`: Debian's Chromium, headless, driven by Selenium
through Debian's chromium-driver (built from the same source package as the browser, so the two always
match; no browser download, no Node runtime in the Python environment). axe-core (npm, tests/e2e/browser)
runs inside every page: 0 serious or critical violations.

Each step takes a screenshot; when a test fails they are kept in test-artifacts/browser/<test>/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from emporium_testbed.ingress import GATEWAY_PORT
from emporium_testbed.process import port_open
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SHOP = f"http://127.0.0.1:{GATEWAY_PORT}"
AXE = HERE / "browser" / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = REPO / "test-artifacts" / "browser"
# Tags every visible, enabled control of the page (data-kb) and returns how many there are.
KEYBOARD_TAG = """
const controls = [...document.querySelectorAll('a[href], button, input:not([type=hidden]), select, textarea')]
  .filter(e => !e.disabled && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden');
controls.forEach((e, i) => { e.dataset.kb = String(i + 1); });
return controls.length;
"""
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--password-store=basic",
    "--window-size=1280,1000",
]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def new_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every URL the browser requested
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver")
    )
    driver.set_page_load_timeout(30)
    return driver


class Journey:
    """A browser with numbered, screenshotted steps and an accessibility check of every page."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder, self.count = name, folder, 0
        self.driver = new_browser()
        self.checked: set[str] = set()

    def shot(self, label: str) -> None:
        self.count += 1
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        self.driver.save_screenshot(str(self.folder / f"{self.name}-{self.count:02d}-{slug}.png"))

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self.shot(label)

    def open(self, path: str) -> None:
        """Load a page; a "Temporarily unavailable" page (a service slow to answer on a busy machine) is
        tried again, as the page tells a person to."""
        for _ in range(5):
            self.driver.get(SHOP + path)
            if "Temporarily unavailable" not in self.driver.title:
                break
            time.sleep(2)
        self.axe()

    def axe(self) -> None:
        """axe-core inside the page; every page (by path template) once."""
        path = re.sub(r"\d+", "N", self.driver.execute_script("return location.pathname"))
        if path in self.checked:
            return
        self.checked.add(path)
        self.driver.execute_script(AXE.read_text())
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations),"
            " e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));"
        )
        bad = [v for v in result if v.get("impact") in ("serious", "critical")]
        assert not bad, f"axe on {path}: " + json.dumps(
            [
                {"id": v["id"], "help": v["help"], "nodes": [n["html"][:120] for n in v["nodes"][:3]]}
                for v in bad
            ],
            indent=1,
        )
        self.keyboard(path)

    def keyboard(self, path: str) -> None:
        """Every visible control of the page is reached with the Tab key alone (axe checks the labels)."""
        count = self.driver.execute_script(KEYBOARD_TAG)
        self.driver.execute_script("document.activeElement && document.activeElement.blur()")
        reached: set[str] = set()
        for _ in range(count + 5):
            ActionChains(self.driver).send_keys(Keys.TAB).perform()
            reached.add(self.driver.execute_script("return (document.activeElement.dataset || {}).kb || ''"))
        missed = self.driver.execute_script(
            "const reached = arguments[0];"
            "return [...document.querySelectorAll('[data-kb]')].filter(e => !reached.includes(e.dataset.kb))"
            ".map(e => e.outerHTML.slice(0, 120))",
            sorted(reached),
        )
        assert not missed, f"not reachable with the keyboard on {path}: {missed}"

    def wait(self, condition, timeout: float = 20, message: str = ""):
        # A page that is being replaced (a click's navigation) has stale elements: look again.
        return WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        ).until(condition, message)

    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_text(self, text: str, timeout: float = 20) -> None:
        self.wait(
            lambda d: text in d.find_element(By.TAG_NAME, "body").text, timeout, f"no {text!r} on the page"
        )

    def fill(self, field_id: str, value: str) -> None:
        element = self.driver.find_element(By.ID, field_id)
        element.clear()
        element.send_keys(value)

    def fill_named(self, name: str, value: str) -> None:
        element = self.driver.find_element(By.NAME, name)
        element.clear()
        element.send_keys(value)

    def submit(self, form_id: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f"#{form_id} button[type=submit]").click()

    def button(self, text: str):
        return self.driver.find_element(By.XPATH, f"//button[normalize-space(.)={json.dumps(text)}]")

    def card(self, name: str):
        """The catalog's link to a product (the card's title)."""
        title = f".//span[@class='card-title' and normalize-space(.)={json.dumps(name)}]"
        return self.driver.find_element(By.XPATH, f"//a[@class='card-link'][{title}]")

    def live(self, timeout: float = 15) -> None:
        """Wait until the page's live-notification websocket is connected."""
        self.wait(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") == "open",
            timeout,
            "the live websocket did not connect",
        )

    def register(self) -> str:
        name = f"shopper{uuid.uuid4().hex[:8]}"
        self.open("/register")
        self.fill("email", f"{name}@example.com")
        self.fill("username", name)
        self.fill("password", "a long enough password")
        self.fill("password_confirm", "a long enough password")
        self.submit("register-form")
        self.wait_text(f"Welcome to Emporium, {name}!")
        return name

    def requested_urls(self) -> list[str]:
        """Every URL the browser requested (documents, redirects, scripts) since the last call."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()


@pytest.fixture
def journeys(request, tmp_path) -> Iterator[callable]:
    """journeys(name) -> a Journey; screenshots kept in test-artifacts/browser/<test>/ if the test failed
    (or EMPORIUM_KEEP_SCREENSHOTS is set)."""
    assert AXE.exists(), "axe-core is missing: run tools/bootstrap.sh (npm ci in tests/e2e/browser)"
    opened: list[Journey] = []

    def start(name: str) -> Journey:
        opened.append(Journey(name, tmp_path))
        return opened[-1]

    yield start
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    for journey in opened:
        if failed:
            with contextlib.suppress(Exception):
                journey.shot("at-failure")
        journey.close()
    if failed or os.environ.get("EMPORIUM_KEEP_SCREENSHOTS"):  # also on success when asked (docs/ images)
        target = ARTIFACTS / request.node.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(tmp_path, target, ignore=shutil.ignore_patterns("*.html", "*.js"))
        print(f"screenshots of every step: {target}")


def admin_credentials(root: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (root / "admin.env").read_text().split())


def test_customer_journey(local, journeys):
    shop = journeys("customer")
    driver = shop.driver
    with shop.step("catalog"):
        shop.open("/")
        assert "Everything in the shop" in shop.text()
        shop.open("/login")
    with shop.step("register"):
        name = shop.register()
        assert f"Sign out ({name})" in shop.text()
    with shop.step("notifications tab"):
        # a second tab stays on the notifications page, listening, while the journey goes on in the first
        journey_tab = driver.current_window_handle
        driver.switch_to.new_window("tab")
        shop.open("/account/notifications")
        shop.live()
        notifications_tab = driver.current_window_handle
        driver.switch_to.window(journey_tab)
    with shop.step("search"):
        search = driver.find_element(By.ID, "header-q")
        search.send_keys("coffee", Keys.ENTER)
        shop.wait_text("Results for “coffee”")
        shop.axe()
        Select(driver.find_element(By.ID, "sort")).select_by_visible_text("Price: high to low")
        driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        shop.wait(lambda d: "sort=-price" in d.current_url)
        titles = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card-title")]
        assert "Stoneware coffee mug" in titles and "Pour-over coffee dripper" in titles
        assert titles.index("Pour-over coffee dripper") < titles.index(
            "Stoneware coffee mug"
        )  # 24.00 > 12.50
    with shop.step("product"):
        shop.card("Stoneware coffee mug").click()
        shop.wait_text("Add to cart")
        shop.axe()
        assert re.search(r"In stock \(\d+\)", driver.find_element(By.ID, "stock").text)
    with shop.step("add to cart"):
        shop.fill("quantity", "2")
        shop.button("Add to cart").click()
        shop.wait_text("Added 2 of “Stoneware coffee mug” to your cart.")
        shop.axe()
        assert driver.find_element(By.ID, "cart-count").text == "2"
    with shop.step("checkout with a double click"):
        ActionChains(driver).double_click(driver.find_element(By.ID, "place-order")).perform()
        shop.wait(lambda d: re.search(r"/account/orders/\d+$", d.current_url), 30, "no order page")
        order_id = driver.current_url.rsplit("/", 1)[1]
        shop.wait_text(f"Thank you! Order #{order_id} was placed.")
        shop.axe()
    with shop.step("order appears once"):
        shop.open("/account/orders")
        rows = driver.find_elements(By.CSS_SELECTOR, "#orders tbody tr")
        assert [r.get_attribute("data-order-id") for r in rows] == [order_id], "a double click made 2 orders"
    with shop.step("notification arrives live"):
        driver.switch_to.window(notifications_tab)
        shop.wait_text(f"Order #{order_id} Confirmed", 60)
        assert driver.find_elements(By.CSS_SELECTOR, "#toasts .toast"), "no toast"
        assert driver.find_element(By.ID, "notification-list").text.count(f"Order #{order_id}") >= 1
        driver.switch_to.window(journey_tab)
    with shop.step("cancel"):
        driver.find_element(By.LINK_TEXT, f"Order #{order_id}").click()
        shop.wait_text("Cancel this order")
        shop.button("Cancel this order").click()
        shop.wait_text(f"Order #{order_id} was cancelled.")
        assert driver.find_element(By.CSS_SELECTOR, "[data-status]").text == "Cancelled"
    with shop.step("cancel notification arrives live"):
        driver.switch_to.window(notifications_tab)
        shop.wait(
            lambda d: "cancelled" in d.find_element(By.ID, "notification-list").text.lower(),
            60,
            "no live notification of the cancellation",
        )
    with shop.step("sign out"):
        driver.switch_to.window(journey_tab)
        driver.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
        shop.wait_text("You are signed out.")
        shop.open("/account/orders")
        assert "/login" in driver.current_url
        shop.open("/no-such-page")
        assert "Page not found" in shop.text()


def test_admin_journey(local, journeys):
    admin, customer = journeys("admin"), journeys("customer")
    product_name = f"Walnut serving board {uuid.uuid4().hex[:6]}"
    with admin.step("admin signs in"):
        credentials = admin_credentials(local)
        admin.open("/login?next=/admin/products")
        admin.fill("email", credentials["ADMIN_EMAIL"])
        admin.fill("password", credentials["ADMIN_PASSWORD"])
        admin.submit("login-form")
        admin.wait(lambda d: d.current_url.endswith("/admin/products"))
        admin.axe()
    with admin.step("create a product"):
        admin.driver.find_element(By.LINK_TEXT, "New product").click()
        admin.wait_text("New product")
        admin.axe()
        admin.fill("name", product_name)
        admin.fill("sku", f"WAL-{uuid.uuid4().hex[:6]}")
        admin.fill("price", "34.90")
        admin.fill("stock_quantity", "7")
        admin.fill("category", "kitchen")
        admin.fill("description", "Oiled walnut, 40 x 25 cm.")
        admin.submit("product-form")
        admin.wait_text(f"Product “{product_name}” was created.")
        admin.axe()
    with admin.step("adjust stock"):
        admin.fill("stock_quantity", "9")
        admin.button("Set stock").click()
        admin.wait_text("Stock set to 9.")
        assert admin.driver.find_element(By.ID, "current-stock").text == "9"
    with customer.step("it is in the catalog"):
        customer.open("/?q=" + product_name.split()[-1])
        customer.wait_text(product_name)
        assert "Only 9 left" in customer.text()  # under 10: shown as low stock
    with customer.step("customer orders it"):
        customer.register()
        customer.open("/?q=" + product_name.split()[-1])
        customer.card(product_name).click()
        customer.button("Add to cart").click()
        customer.wait_text("to your cart")
        customer.driver.find_element(By.ID, "place-order").click()
        customer.wait(lambda d: re.search(r"/account/orders/\d+$", d.current_url), 30)
        order_id = customer.driver.current_url.rsplit("/", 1)[1]
        customer.live()
    with admin.step("admin finds the order"):
        admin.open("/admin/orders")
        admin.fill("order_id", order_id)
        admin.button("Open").click()
        admin.wait_text(f"Order #{order_id}")
        admin.axe()
    with admin.step("admin confirms and ships"):
        admin.button("Mark as confirmed").click()
        admin.wait_text(f"Order #{order_id} is now confirmed.")
        admin.button("Mark as shipped").click()
        admin.wait_text(f"Order #{order_id} is now shipped.")
    with customer.step("customer sees it shipped, live"):
        customer.wait(
            lambda d: d.find_element(By.CSS_SELECTOR, "#order-detail [data-status]").text == "Shipped",
            60,
            "the order page did not update live",
        )
        customer.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#toasts .toast"), 10, "no toast")
        assert "shipped" in customer.driver.find_element(By.ID, "toasts").text.lower()
    with admin.step("failed notifications"):
        admin.open("/admin/notifications")
        assert "Failed notifications" in admin.text()
        admin.open("/admin/notifications?status=all")
        assert admin.driver.find_elements(By.CSS_SELECTOR, "#admin-notifications tbody tr")
    with admin.step("deactivate"):
        admin.open("/admin/products?q=" + product_name.split()[-1])
        admin.driver.find_element(By.LINK_TEXT, product_name).click()
        admin.button("Deactivate product").click()
        admin.wait_text("The product was deactivated")
        customer.open("/?q=" + product_name.split()[-1])
        customer.wait_text("Nothing found")


# -- sign in with an OpenID Connect provider (issue 16) -----------------------------------------------


def provider_login(shop: Journey, subject: str, claims: dict) -> None:
    """On the provider's own login page (mock-oauth2-server, another origin): who signs in, and the claims of
    the ID token it issues."""
    shop.wait(lambda d: "/authorize" in d.current_url, 30, "not on the provider's sign-in page")
    assert not shop.driver.current_url.startswith(SHOP + "/")
    shop.fill_named("username", subject)
    shop.fill_named("claims", json.dumps(claims))
    shop.driver.find_element(By.CSS_SELECTOR, "form input[type=submit]").click()


def sign_in_with_provider(shop: Journey, subject: str, claims: dict, next_path: str = "/") -> None:
    shop.open("/login?next=" + next_path)
    button = shop.driver.find_element(By.ID, "sign-in-with-mock")
    assert button.text == "Sign in with Test ID (local)"
    button.click()
    provider_login(shop, subject, claims)


def sign_out(shop: Journey) -> None:
    shop.driver.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    shop.wait_text("You are signed out.")


def test_sign_in_with_an_openid_provider(local, journeys):
    """The storefront's button -> the users service (through the ingress) -> the local platform's real OpenID
    provider -> back signed in: the tokens sealed in the HttpOnly session cookie, none in any URL."""
    shop = journeys("oidc")
    driver = shop.driver
    name = f"oidc{uuid.uuid4().hex[:8]}"
    claims = {"email": f"{name}@example.com", "email_verified": True, "preferred_username": name}
    with shop.step("sign-up through the provider"):
        sign_in_with_provider(shop, f"sub-{name}", claims, next_path="/cart")
        shop.wait(lambda d: d.current_url == SHOP + "/cart", 30, "not back in the shop's cart")
        shop.wait_text(f"Welcome, {name}!")
        shop.axe()
        assert f"Sign out ({name})" in shop.text()
        session = next(c for c in driver.get_cookies() if c["name"].endswith("emporium_session"))
        assert session["httpOnly"] and session["sameSite"] == "Lax"
        assert not driver.execute_script("return document.cookie").count("emporium_session")
        urls = shop.requested_urls()
        assert any("/auth/oidc/mock/callback?" in u for u in urls), urls  # the real flow, through the edge
        assert not [u for u in urls if "eyJ" in u or "access_token" in u], "a token in a URL"
    with shop.step("the orders page works with the provider's account"):
        shop.open("/account/orders")
        assert "/login" not in driver.current_url
    with shop.step("sign out, sign in again: the same account"):
        sign_out(shop)
        sign_in_with_provider(shop, f"sub-{name}", {})  # (issuer, sub) finds it; no email needed now
        shop.wait_text(f"Welcome, {name}!")
        assert f"Sign out ({name})" in shop.text()
        sign_out(shop)
    with shop.step("an unverified email never signs in to a password account"):
        owner = shop.register()  # a password account ...
        sign_out(shop)
        unverified = {"email": f"{owner}@example.com", "email_verified": False}
        sign_in_with_provider(shop, f"sub-{uuid.uuid4().hex[:8]}", unverified)  # ... its email, unverified
        shop.wait_text("has not verified your email address")
        assert urlsplit(driver.current_url).path == "/login"
        shop.axe()
        assert "Sign out" not in shop.text()
    with shop.step("a verified email is not linked without the owner's password"):
        verified = {"email": f"{owner}@example.com", "email_verified": True}
        sign_in_with_provider(shop, f"sub-{uuid.uuid4().hex[:8]}", verified)
        shop.wait_text("An account with this email address already exists")
        assert "Sign out" not in shop.text()


# -- browser clients of other origins -------------------------------------------------------------------

CROSS_ORIGIN_PAGE = """<!doctype html><html lang="en">
<head><meta charset="utf-8"><title>Another app</title></head>
<body><main><h1>Another app</h1><pre id="result">running</pre></main><script>
const api = "http://127.0.0.1:%(gateway)d";
async function run() {
  const out = {};
  const email = "cors" + Date.now() + "@example.com";
  let r = await fetch(api + "/users/register", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({email, username: "cors" + Date.now(), password: "a long enough password"})});
  out.register = r.status;
  r = await fetch(api + "/users/login", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({email, password: "a long enough password"})});
  out.login = r.status;
  const token = (await r.json()).access_token;
  r = await fetch(api + "/orders", {headers: {"Authorization": "Bearer " + token}});
  out.orders = r.status;
  out.request_id = r.headers.get("x-request-id") !== null;
  out.products = (await fetch(api + "/products?limit=1")).status;
  out.websocket = await new Promise((resolve) => {
    const ws = new WebSocket("ws://127.0.0.1:%(gateway)d/ws/notifications", ["bearer", token]);
    ws.onmessage = (e) => { resolve(JSON.parse(e.data).type + " " + ws.protocol); ws.close(); };
    ws.onerror = () => resolve("error");
    setTimeout(() => resolve("timeout"), 10000);
  });
  document.getElementById("result").textContent = JSON.stringify(out);
}
run().catch((e) => { document.getElementById("result").textContent = "failed: " + e; });
</script></body></html>"""


@pytest.fixture
def other_origin(tmp_path) -> Iterator[str]:
    """A page served from one of the dev-server origins k8s/values/local.yaml allows (5173, else 3000)."""
    (tmp_path / "index.html").write_text(CROSS_ORIGIN_PAGE % {"gateway": GATEWAY_PORT})
    port = next((p for p in (5173, 3000) if not port_open("127.0.0.1", p)), None)
    assert port, "ports 5173 and 3000 are both taken: the cross-origin page needs one of them"
    server = ThreadingHTTPServer(
        ("127.0.0.1", port), partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_origin_uses_the_api_and_the_websocket(local, journeys, other_origin):
    app = journeys("cors")
    with app.step("cross-origin page"):
        app.driver.get(other_origin + "/index.html")
        try:
            app.wait(lambda d: d.find_element(By.ID, "result").text != "running", 30)
        except TimeoutException:
            pytest.fail("the cross-origin page did not finish")
        result = app.driver.find_element(By.ID, "result").text
        assert not result.startswith("failed"), result
        out = json.loads(result)
        assert out == {
            "register": 201,
            "login": 200,
            "orders": 200,
            "request_id": True,
            "products": 200,
            "websocket": "connected bearer",
        }, out


def test_preflights_and_origins_at_the_edge(local):
    allowed, stranger = "http://localhost:5173", "http://127.0.0.1:9999"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with httpx.Client(base_url=SHOP, timeout=10) as http:
        for path in ("/orders", "/notifications", "/users/login", "/products", "/users/me"):
            response = http.options(path, headers={"Origin": allowed, **preflight})
            assert response.status_code == 200, (path, response.status_code, response.text[:200])
            assert response.headers["access-control-allow-origin"] == allowed
            assert "authorization" in response.headers["access-control-allow-headers"].lower()
            refused = http.options(path, headers={"Origin": stranger, **preflight})
            assert "access-control-allow-origin" not in refused.headers, path
        # the preflight needs no token, the request itself still does
        assert http.get("/orders", headers={"Origin": allowed}).status_code == 403


def test_websocket_tokens_stay_out_of_the_access_log(local):
    """The subprotocol form is accepted at the edge; neither it nor ?access_token= lands in the log."""
    import asyncio

    import websockets

    with httpx.Client(base_url=SHOP, timeout=10) as http:
        name = f"log{uuid.uuid4().hex[:8]}"
        body = {"email": f"{name}@example.com", "username": name, "password": "a long enough password"}
        assert http.post("/users/register", json=body).status_code == 201
        token = http.post("/users/login", json={"email": body["email"], "password": body["password"]}).json()[
            "access_token"
        ]

    async def connect() -> list[str]:
        url = f"ws://127.0.0.1:{GATEWAY_PORT}/ws/notifications"
        async with websockets.connect(url, subprotocols=["bearer", token]) as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))["type"]
        async with websockets.connect(f"{url}?access_token={token}") as ws:
            second = json.loads(await asyncio.wait_for(ws.recv(), 10))["type"]
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(url, subprotocols=["bearer", token[:-4] + "AAAA"]):
                pass
        return [first, second]

    assert asyncio.run(connect()) == ["connected", "connected"]
    time.sleep(1.5)  # Envoy flushes its access log about every second
    log = (local / "logs" / "ingress-gateway.log").read_text(errors="replace")
    assert "/ws/notifications" in log
    assert token not in log and token.split(".")[2] not in log
