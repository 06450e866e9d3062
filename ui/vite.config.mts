// Builds the job view into one self-contained HTML file (scripts and styles inlined) inside the Python package:
// fts_mcp/ui/job.html, served as the ui:// resource and at /ui. `npm run build:ui`; the result is committed, so
// installing from a clone or a wheel needs no npm.
import { fileURLToPath } from "node:url";

import { defineConfig } from "vite";
import { viteSingleFile } from "vite-plugin-singlefile";

const here = fileURLToPath(new URL(".", import.meta.url));

export default defineConfig({
  root: here,
  base: "./",
  logLevel: "warn",
  plugins: [viteSingleFile({ removeViteModuleLoader: true })],
  build: {
    outDir: fileURLToPath(new URL("../fts_mcp/ui", import.meta.url)),
    emptyOutDir: false, // the folder is a Python package: keep its __init__.py
    target: "es2022",
    reportCompressedSize: false,
    rollupOptions: { input: fileURLToPath(new URL("job.html", import.meta.url)) },
  },
});
