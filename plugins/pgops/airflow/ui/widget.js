// pgops recoverability widget for the Airflow home dashboard (react_apps, destination "dashboard").
// Airflow imports this module and renders globalThis.AirflowPlugin as a React component. It ships no React
// of its own and needs no build step: the component returns one plain React element, a same-origin iframe
// of /pgops/widget (server-rendered, behind the Airflow login), sized to its content when it loads.
const ELEMENT = Symbol.for("react.transitional.element");
const src = new URL("../widget", import.meta.url).href;

function fit(frame) {
  if (!frame) return;
  frame.addEventListener("load", () => {
    try {
      frame.style.height = Math.min(frame.contentDocument.body.scrollHeight + 8, 400) + "px";
    } catch (e) { /* not same-origin: keep the default height */ }
  });
}

function PgopsRecoverability() {
  const props = {
    src, title: "pgops recoverability", ref: fit,
    style: { border: "none", width: "100%", height: "120px", display: "block", colorScheme: "normal" },
  };
  return { $$typeof: ELEMENT, type: "iframe", key: null, ref: fit, props, _owner: null, _store: {} };
}

globalThis.AirflowPlugin = PgopsRecoverability;
globalThis["pgops recoverability"] = PgopsRecoverability;
export default PgopsRecoverability;
