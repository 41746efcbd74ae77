// KAT dashboard: live refresh, confirmations, the new-run form's checks. No framework, no build step.
(function () {
  "use strict";

  // A log panel opens at its tail; a refresh keeps it there unless the reader scrolled up, and keeps the
  // sections (<details>) the reader opened or closed as they were.
  const pinLogs = function (root) {
    root.querySelectorAll("pre.log").forEach(function (pre) { pre.scrollTop = pre.scrollHeight; });
  };
  const viewState = function (root) {
    return {
      open: Array.from(root.querySelectorAll("details")).map(function (d) { return d.open; }),
      logs: Array.from(root.querySelectorAll("pre.log")).map(function (pre) {
        return {atEnd: pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24, top: pre.scrollTop};
      }),
    };
  };
  const restoreView = function (root, state) {
    root.querySelectorAll("details").forEach(function (d, i) {
      if (i < state.open.length) d.open = state.open[i];
    });
    root.querySelectorAll("pre.log").forEach(function (pre, i) {
      const was = state.logs[i];
      pre.scrollTop = !was || was.atEnd ? pre.scrollHeight : was.top;
    });
  };
  pinLogs(document);

  // Live refresh: the [data-live] element is re-fetched from the same URL every data-live milliseconds
  // while it contains something active ([data-active]: a queued or running run).
  const live = document.querySelector("[data-live]");
  if (live) {
    const every = parseInt(live.dataset.live, 10) || 2000;
    const tick = async function () {
      if (!live.querySelector("[data-active]") && !live.hasAttribute("data-active")) return;
      try {
        const response = await fetch(location.href, {credentials: "same-origin", headers: {"X-Live": "1"}});
        if (response.ok) {
          const doc = new DOMParser().parseFromString(await response.text(), "text/html");
          const fresh = doc.querySelector("[data-live]");
          if (fresh) {
            const state = viewState(live);
            live.innerHTML = fresh.innerHTML;
            restoreView(live, state);
            bind(live);
          }
        }
      } catch (e) { /* the server restarts: try again next time */ }
      setTimeout(tick, every);
    };
    setTimeout(tick, every);
  }

  function bind(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.bound) return;
      form.dataset.bound = "1";
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
    root.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
      if (select.dataset.bound) return;
      select.dataset.bound = "1";
      select.addEventListener("change", function () { select.form.submit(); });
    });
  }
  bind(document);

  // New run: mark changed fields, and "Check values" asks the server whether the config loads.
  const form = document.getElementById("run-form");
  if (form) {
    form.querySelectorAll("[data-default]").forEach(function (input) {
      const mark = function () {
        input.closest(".field").classList.toggle("changed", input.value.trim() !== input.dataset.default);
      };
      input.addEventListener("input", mark);
      input.addEventListener("change", mark);
    });
    const result = document.getElementById("check-result");
    const check = async function () {
      const fields = {};
      new FormData(form).forEach(function (value, key) { fields[key] = value; });
      const overrides = [];
      form.querySelectorAll("[name^='cfg.']").forEach(function (input) {
        const key = input.name.slice(4);
        const value = input.value.trim();
        const initial = input.dataset.default;
        if (input.type === "password" && value === "") return;
        if (initial !== undefined && value !== initial) overrides.push(key + "=" + value);
      });
      (fields.extra || "").split("\n").forEach(function (line) { if (line.trim()) overrides.push(line.trim()); });
      result.className = "check";
      result.textContent = "checking…";
      try {
        const response = await fetch("/api/config/check", {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json"},
          body: JSON.stringify({profile: fields.profile, overrides: overrides}),
        });
        const body = await response.json();
        if (response.ok) {
          result.className = "check ok";
          result.textContent = "OK: " + (overrides.length ? overrides.join(" ") : "the profile as it is") +
            " (config " + body.config_hash + ")" + (body.purpose ? ". Profile " + body.profile + ": " + body.purpose : "");
        } else {
          result.className = "check error";
          result.textContent = body.detail;
        }
        return response.ok;
      } catch (e) {
        result.className = "check error";
        result.textContent = "could not reach the server";
        return false;
      }
    };
    document.getElementById("check-button").addEventListener("click", check);
    form.addEventListener("submit", async function (event) {
      if (form.dataset.checked) return;
      event.preventDefault();
      if (await check()) {
        form.dataset.checked = "1";
        form.submit();
      }
    });
  }
})();
