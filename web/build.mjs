// Builds the browser bundles Tidings serves into src/tidings/server/static/ (`make web`).
// The output is committed, so running Tidings never needs npm.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.join(here, "..", "src", "tidings", "server", "static");

await build({
  entryPoints: { "orders.bundle": path.join(here, "src", "orders.js") },
  outdir,
  bundle: true,
  format: "iife",
  platform: "browser",
  target: ["es2020"],
  minify: true,
  legalComments: "none",
  logLevel: "info",
  banner: {
    js: "/* Tidings order-tracking demo. Built from web/src/orders.js with esbuild; includes @supabase/supabase-js (MIT). */",
  },
});
