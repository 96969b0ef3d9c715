// Runs first: every script error, rejected promise, blocked fetch or Vega warning is noted
// on <html data-qcd-errors> (and data-qcd-warnings), where readers and tests can see it.
(function () {
  "use strict";
  var root = document.documentElement;
  var errors = [], warnings = [];
  function noteError(message) {
    errors.push(String(message));
    root.setAttribute("data-qcd-errors", JSON.stringify(errors));
  }
  function noteWarning(message) {
    warnings.push(String(message));
    root.setAttribute("data-qcd-warnings", JSON.stringify(warnings));
  }
  root.setAttribute("data-qcd-errors", "[]");
  root.setAttribute("data-qcd-warnings", "[]");
  window.qcdNoteError = noteError;
  window.qcdNoteWarning = noteWarning;
  window.addEventListener("error", function (e) {
    noteError("script error: " + e.message + " (line " + e.lineno + ")");
  });
  window.addEventListener("unhandledrejection", function (e) {
    noteError("unhandled rejection: " + e.reason);
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    noteError("blocked by the page's policy: " + e.violatedDirective + " " + e.blockedURI);
  });
})();
