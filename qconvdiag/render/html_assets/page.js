// Draws every figure of the page with vegaEmbed (bundled inline above), then records on
// <html>: data-qcd-figures (how many), data-qcd-rendered (how many drew) and
// data-qcd-status="done". Copy buttons for the code blocks; a click on a heatmap cell shows
// its `qconvdiag trace` command under the figure, ready to copy.
(function () {
  "use strict";
  var root = document.documentElement;
  var logger = {
    _level: 0,
    level: function (value) { if (value !== undefined) { this._level = value; return this; }
                              return this._level; },
    error: function () { window.qcdNoteError("vega: " + Array.from(arguments).join(" ")); return this; },
    warn: function () { window.qcdNoteWarning("vega: " + Array.from(arguments).join(" ")); return this; },
    info: function () { return this; },
    debug: function () { return this; }
  };
  var options = {
    renderer: "svg",
    logger: logger,
    ast: true,  // expressions interpreted: the page needs no eval (its policy forbids it)
    actions: {export: true, source: false, compiled: false, editor: false}
  };

  function showTrace(figure, item) {
    var datum = item && item.datum;
    var box = figure.querySelector(".qcd-picked code");
    if (!datum || !datum.trace || !box) return;
    box.textContent = datum.trace;
    figure.querySelector(".qcd-picked").hidden = false;
  }

  // The first drawn item carrying a trace command (a heatmap cell), depth first.
  function firstTrace(node) {
    if (!node) return null;
    if (node.datum && node.datum.trace) return node.datum.trace;
    var children = node.items || [];
    for (var i = 0; i < children.length; i++) {
      var found = firstTrace(children[i]);
      if (found) return found;
    }
    return null;
  }

  function draw(figure, specs) {
    var spec = specs[figure.getAttribute("data-spec")];
    if (!spec) {
      window.qcdNoteError("no spec for figure " + figure.getAttribute("data-spec"));
      return Promise.resolve(false);
    }
    return vegaEmbed(figure.querySelector(".qcd-plot"), spec, options).then(function (result) {
      result.view.addEventListener("click", function (event, item) { showTrace(figure, item); });
      var trace = firstTrace(result.view.scenegraph().root);
      if (trace) figure.setAttribute("data-first-trace", trace);  // what a hover shows
      figure.setAttribute("data-rendered", "true");
      return true;
    }).catch(function (e) {
      window.qcdNoteError("figure " + figure.getAttribute("data-spec") + ": " + e);
      return false;
    });
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    var area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    return Promise.resolve();
  }

  function addCopyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var code = button.parentElement.querySelector("code");
        copyText(code.textContent).then(function () {
          button.textContent = "copied";
          setTimeout(function () { button.textContent = "copy"; }, 1500);
        }, function () { button.textContent = "select and copy"; });
      });
    });
  }

  addCopyButtons();
  var specs = JSON.parse(document.getElementById("qcd-specs").textContent);
  var figures = Array.from(document.querySelectorAll(".qcd-figure"));
  root.setAttribute("data-qcd-figures", String(figures.length));
  Promise.all(figures.map(function (f) { return draw(f, specs); })).then(function (done) {
    root.setAttribute("data-qcd-rendered", String(done.filter(Boolean).length));
    root.setAttribute("data-qcd-status", "done");
  });
})();
