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

// Slider range and step follow the strength unit (the number box takes any value).
function millmApplyRanges() {
  const form = document.getElementById("steering-form");
  const units = document.getElementById("steering-units");
  if (!form || !units || !form.dataset.ranges) return;
  const range = JSON.parse(form.dataset.ranges)[units.value];
  if (!range) return;
  form.querySelectorAll("input.strength-range").forEach((input) => {
    input.min = -range.max; input.max = range.max; input.step = range.step;
    input.value = input.nextElementSibling.value;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  millmSteeringEmpty();
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

document.addEventListener("htmx:beforeRequest", () => {
  // A refusal shown for an earlier action must not linger beside the next one's result.
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
