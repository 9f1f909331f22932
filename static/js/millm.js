// Page behaviour that htmx attributes cannot express; everything else is server-rendered.
"use strict";

function millmSteeringChanged() {
  const dirty = document.getElementById("steering-dirty");
  if (dirty) dirty.hidden = false;
  millmSteeringEmpty();
}

function millmSteeringEmpty() {
  const rows = document.getElementById("steering-rows");
  const empty = document.getElementById("steering-empty");
  if (rows && empty) empty.hidden = rows.children.length > 0;
}

// Slider range and step follow the strength unit (the number box takes any value). A calibrated feature's
// row carries, per unit, its factor to raw and useful range: a unit switch keeps the same raw strength and
// spans twice the top of the useful range (steering/views.py feature_slider_range).
function millmApplyRanges() {
  const form = document.getElementById("steering-form");
  const units = document.getElementById("steering-units");
  if (!form || !units || !form.dataset.ranges) return;
  const previous = units.dataset.previous || units.value;
  units.dataset.previous = units.value;
  const fallback = JSON.parse(form.dataset.ranges)[units.value];
  form.querySelectorAll("input.strength-range").forEach((input) => {
    const row = input.closest(".slider-row");
    const calibration = row && row.dataset.calibration ? JSON.parse(row.dataset.calibration) : {};
    const from = calibration[previous], to = calibration[units.value];
    const number = input.nextElementSibling;
    if (from && to && previous !== units.value) {
      number.value = Number((parseFloat(number.value) * from.factor / to.factor).toPrecision(3));
    }
    let range = fallback;
    if (to && to.high) {
      const top = Number((2 * Math.abs(to.high)).toPrecision(2));
      range = { max: top, step: Number((top / 200).toPrecision(2)) };
    }
    if (!range) return;
    input.min = -range.max; input.max = range.max; input.step = range.step;
    input.value = number.value;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  millmSteeringEmpty();
  const unitSelect = document.getElementById("steering-units");
  if (unitSelect) unitSelect.dataset.previous = unitSelect.value;
  const form = document.getElementById("steering-form");
  if (form) {
    form.addEventListener("input", (event) => {
      if (event.target.closest("#steering-rows")) millmSteeringChanged();
    });
    form.addEventListener("change", (event) => {
      if (["mode", "positions", "units"].includes(event.target.name)) millmSteeringChanged();
      if (event.target.name === "units") millmApplyRanges();
    });
  }
});

document.addEventListener("htmx:beforeRequest", (event) => {
  // A refusal shown for an earlier action must not linger beside the next one's result; a background
  // request (a poll, a load) is not a next action: it must not hide the refusal a second after it appears.
  const trigger = (event.detail.elt && event.detail.elt.getAttribute("hx-trigger")) || "";
  if (/\bevery\b/.test(trigger) || trigger.trim() === "load") return;
  const box = document.getElementById("action-error");
  if (box) box.hidden = true;
});

document.addEventListener("htmx:afterSettle", (event) => {
  const target = event.detail.target;
  if (!target) return;
  if (target.id === "steering-rows") {
    millmSteeringChanged();
    const added = target.querySelector(".slider-new");
    if (added) {
      added.scrollIntoView({ block: "nearest", behavior: "instant" });
      added.querySelector("input.strength").focus({ preventScroll: true });
      setTimeout(() => added.classList.remove("slider-new"), 1500);
    }
  }
  if (target.id === "steering-status") {
    const dirty = document.getElementById("steering-dirty");
    if (dirty) dirty.hidden = true;
  }
});

// Monitor: pause/resume the live stream (messages arriving while paused are dropped and counted),
// clear, and a separator wherever the stream passes from one request to another (newest first).
(() => {
  let paused = false;
  let skipped = 0;
  document.addEventListener("click", (event) => {
    const button = event.target.closest("#monitor-pause, #monitor-clear");
    if (!button) return;
    if (button.id === "monitor-clear") {
      document.getElementById("activation-log").replaceChildren();
      return;
    }
    paused = !paused;
    skipped = 0;
    button.textContent = paused ? "Resume" : "Pause";
    button.dataset.paused = String(paused);
    const note = document.getElementById("monitor-skipped");
    note.hidden = !paused;
    note.textContent = "Paused";
  });
  document.addEventListener("htmx:wsBeforeMessage", (event) => {
    if (!paused || !document.getElementById("monitor-stream")) return;
    event.preventDefault();
    skipped += 1;
    document.getElementById("monitor-skipped").textContent = `Paused · ${skipped} update(s) not shown`;
  });
  document.addEventListener("htmx:wsAfterMessage", () => {
    const log = document.getElementById("activation-log");
    if (!log) return;
    for (const frame of log.querySelectorAll(".frame:not([data-seen])")) {
      frame.dataset.seen = "1";
      let older = frame.nextElementSibling;
      while (older && !older.classList.contains("frame")) older = older.nextElementSibling;
      if (older && older.dataset.request !== frame.dataset.request && !frame.nextElementSibling.classList.contains("request-sep")) {
        const sep = document.createElement("div");
        sep.className = "request-sep";
        const link = document.createElement("a");
        link.href = `/history/${encodeURIComponent(frame.dataset.request)}/`;
        link.textContent = `request ${frame.dataset.request.slice(0, 12)}`;
        sep.append("▲ ", link);
        frame.after(sep);
      }
    }
  });
})();

// Models and SAEs pages: every /ws/progress/ event and download action drops its row into the hidden
// #live-rows; each row replaces the row with its id, or goes to the top of its table (data-into), or is
// dropped when this page has no such table — so no event ever targets a missing element. A stale
// answer (an HTTP reply arriving after a newer event) never rolls a download back.
(() => {
  const rank = { queued: 0, running: 1, completed: 2, failed: 2, cancelled: 2 };
  function newer(row, old) {
    if (!row.dataset.status || !old.dataset.status) return true;
    const a = rank[row.dataset.status], b = rank[old.dataset.status];
    if (a !== b) return a > b;
    return a !== 1 || Number(row.dataset.bytes) >= Number(old.dataset.bytes);
  }
  function route(sink) {
    for (const row of Array.from(sink.children)) {
      const old = row.id ? Array.from(document.querySelectorAll(`[id="${row.id}"]`)).find((el) => el !== row) : null;
      if (old) {
        if (row.dataset.deleted) old.remove();
        if (!row.dataset.deleted && newer(row, old)) old.replaceWith(row); else row.remove();
        continue;
      }
      const into = row.dataset.into && document.getElementById(row.dataset.into);
      if (into && !row.dataset.deleted) {
        into.querySelectorAll(":scope > tr:not([id])").forEach((placeholder) => placeholder.remove());
        into.prepend(row);
      } else {
        row.remove();
      }
    }
  }
  document.addEventListener("DOMContentLoaded", () => {
    const sink = document.getElementById("live-rows");
    if (sink) new MutationObserver(() => route(sink)).observe(sink, { childList: true });
  });
})();
