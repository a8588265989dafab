// Consistency page: "failures only" filter. Data comes from a JSON <script> block
// (embedded with Jinja's tojson, so spec strings cannot break out of it).
(function () {
  "use strict";
  var dataEl = document.getElementById("cell-data");
  var toggle = document.getElementById("failures-only");
  if (!dataEl || !toggle) { return; }
  var cells = JSON.parse(dataEl.textContent);
  var bad = {};
  var nBad = 0;
  cells.forEach(function (c) {
    if (c.state === "fail" || c.state === "failed" || c.state === "missing") { bad[c.key] = true; nBad += 1; }
  });
  var count = document.getElementById("failures-count");
  if (count) { count.textContent = String(nBad); }
  toggle.addEventListener("change", function () {
    document.querySelectorAll(".tile[data-key]").forEach(function (el) {
      var hide = toggle.checked && !bad[el.getAttribute("data-key")];
      el.classList.toggle("hidden", hide);
    });
  });
})();
