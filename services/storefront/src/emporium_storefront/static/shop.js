// Emporium storefront: live notifications (toasts and lists) over the storefront's own websocket.
// The page never sees a token: /live is authenticated by the HttpOnly session cookie.
"use strict";

(function () {
  var body = document.body;
  var livePath = body.getAttribute("data-live");
  var toasts = document.getElementById("toasts");
  var unread = document.getElementById("unread-count");
  var retryDelay = 1000;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function toast(subject, message) {
    var item = el("div", "toast");
    item.setAttribute("role", "status");
    item.appendChild(el("strong", "toast-title", subject));
    if (message) item.appendChild(el("span", "toast-body", message));
    var close = el("button", "toast-close", "\u00d7");
    close.type = "button";
    close.setAttribute("aria-label", "Dismiss notification");
    close.addEventListener("click", function () { item.remove(); });
    item.appendChild(close);
    toasts.appendChild(item);
    setTimeout(function () { item.remove(); }, 10000);
  }

  function addToList(data) {
    var list = document.getElementById("notification-list");
    if (!list) return;
    var empty = list.querySelector(".empty-item");
    if (empty) empty.remove();
    var item = el("li", "notification notification-new");
    item.appendChild(el("span", "notification-subject", data.subject || "Notification"));
    var meta = el("span", "muted", "just now");
    if (data.order_id) {
      meta.appendChild(document.createTextNode(" \u00b7 "));
      var link = el("a", "", "Order #" + data.order_id);
      link.href = "/account/orders/" + encodeURIComponent(data.order_id);
      meta.appendChild(link);
    }
    item.appendChild(meta);
    list.insertBefore(item, list.firstChild);
  }

  // The order on screen changed (an administrator moved it): show its new state.
  function refreshOrder(data) {
    var detail = document.getElementById("order-detail");
    var table = document.getElementById("orders");
    var mine = detail && String(data.order_id) === detail.getAttribute("data-order-id");
    if (!mine && !table) return;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var id = mine ? "order-detail" : "orders";
        var replacement = fresh.getElementById(id);
        var current = document.getElementById(id);
        if (replacement && current) current.replaceWith(document.importNode(replacement, true));
      });
  }

  function onMessage(event) {
    var message;
    try { message = JSON.parse(event.data); } catch (e) { return; }
    if (message.type === "connected") { body.setAttribute("data-live-state", "open"); return; }
    if (message.type !== "notification") return;
    var data = message.data || {};
    toast(data.subject || "Notification", data.message || "");
    addToList(data);
    if (unread) {
      unread.hidden = false;
      unread.textContent = String(Number(unread.textContent || "0") + 1);
    }
    if (data.order_id) refreshOrder(data);
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + livePath);
    socket.addEventListener("message", onMessage);
    socket.addEventListener("open", function () { retryDelay = 1000; });
    socket.addEventListener("close", function (event) {
      body.setAttribute("data-live-state", "closed");
      if (event.code === 4401) return; // signed out
      if (event.code === 4402) {
        // the access token is about to expire: a request renews the session cookie, then reconnect
        fetch("/session", { credentials: "same-origin" }).then(function (r) {
          if (r.status === 204) setTimeout(connect, 100);
        });
        return;
      }
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 30000);
    });
  }

  if (livePath && toasts && "WebSocket" in window) connect();
})();
