// End-to-end check of a `prefixcap export --web` page in headless Chromium, driven by playwright-core
// (tests/test_web_demo.py runs it). Opens the served page, waits for the model, sets the image files on its
// <input type=file>, waits until every caption is shown, saves a screenshot and prints what the page did as JSON:
//
//   node web/e2e.mjs --url http://127.0.0.1:PORT/ --screenshot shot.png [--probes probes.json] [--langs en,de] \
//     image.png ...
//
//   {"status", "results": [{name, lang, caption, alt, ms, ids, error?}], "requests", "ready_requests", "blocked",
//    "failed", "errors", "warnings", "csp", "menu", "decoded", "tidied", "pixels"}
//
// csp: the Content-Security-Policy violations the page reported; ready_requests: what the page had requested when it
// was ready, before any image; menu: the language menu ({hidden, disabled, options: [[value, label], ...]});
// warnings: the console's. --langs: caption the images once in each of these languages, in turn, each chosen in the
// page's language menu first (results in that order); without it, once in the page's default.
//
// Only the page's own origin is reachable: any other request is aborted and listed in "blocked", so a page that
// needs a CDN fails. probes.json may ask for {"decode": [[ids], ...], "tidy": [text, ...], "pixels": true}: the
// page's decode() of each id list, tidyAltText() of each text, and each file's pixel values (base64 float32).
// The browser is /usr/bin/chromium (or --chromium PATH), never a downloaded one; a fresh profile each run.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: options, positionals: files } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: 'string' },
    screenshot: { type: 'string' },
    probes: { type: 'string' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    timeout: { type: 'string', default: '90' },
    langs: { type: 'string' },
  },
});
// Without the background-networking flags Chromium waits on services it cannot reach on a closed network.
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const timeout = Number(options.timeout) * 1000;

const profile = mkdtempSync(join(tmpdir(), 'prefixcap-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: options.chromium, headless: true, args: FLAGS, viewport: { width: 900, height: 700 }, timeout,
  });
  const report = { requests: [], blocked: [], failed: [], errors: [], warnings: [] };
  const origin = new URL(options.url).origin;
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith(origin + '/')) return route.continue();
    report.blocked.push(url);
    return route.abort();
  });
  // Content-Security-Policy violations, as the page sees them (Chromium also logs each as a console error).
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (event) => window.__cspViolations.push(
      `${event.effectiveDirective} blocked ${event.blockedURI || '(inline)'} at ${event.sourceFile}:${event.lineNumber}`));
  });
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('request', (request) => report.requests.push(request.url()));
  page.on('response', (response) => {
    if (response.status() >= 400) report.failed.push(`${response.status()} ${response.url()}`);
  });
  page.on('requestfailed', (request) => report.failed.push(`${request.failure()?.errorText} ${request.url()}`));
  page.on('pageerror', (error) => report.errors.push(String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error') report.errors.push(message.text());
    if (message.type() === 'warning') report.warnings.push(message.text());
  });

  await page.goto(options.url);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state));
  report.status = await page.textContent('#status');
  if (await page.evaluate(() => document.body.dataset.state) === 'ready') {
    report.ready_requests = [...report.requests];
    report.menu = await page.evaluate(() => {
      const menu = document.querySelector('#lang');
      return { hidden: menu.closest('[hidden]') !== null, disabled: menu.disabled,
        options: [...menu.options].map((option) => [option.value, option.textContent]) };
    });
    const langs = options.langs ? options.langs.split(',') : [null];
    for (const [round, lang] of langs.entries()) {
      if (lang !== null) await page.selectOption('#lang', lang);
      await page.setInputFiles('#files', []); // a change event for the same files again
      await page.setInputFiles('#files', files);
      await page.waitForFunction((n) => window.prefixcap.results.length === n, files.length * (round + 1));
    }
    report.results = await page.evaluate(() => window.prefixcap.results);
    const probes = options.probes ? JSON.parse(readFileSync(options.probes, 'utf8')) : {};
    Object.assign(report, await page.evaluate(runProbes, probes));
  }
  report.csp = await page.evaluate(() => window.__cspViolations);
  if (options.screenshot) await page.screenshot({ path: options.screenshot, fullPage: true });
  process.stdout.write(JSON.stringify(report) + '\n');
} catch (error) {
  process.stderr.write(`e2e: ${error.stack || error}\n`);
  process.exitCode = 1;
} finally {
  await context?.close();
  rmSync(profile, { recursive: true, force: true });
}

// Runs in the page.
async function runProbes({ decode = [], tidy = [], pixels = false }) {
  const { captioner, tidyAltText } = window.prefixcap;
  const out = { decoded: decode.map((ids) => captioner.decode(ids)), tidied: tidy.map((text) => tidyAltText(text)) };
  if (pixels) {
    const { readImage } = await import(new URL('caption.js', document.baseURI).href);
    out.pixels = [];
    for (const file of document.querySelector('#files').files) {
      const bytes = new Uint8Array(captioner.pixelValues(await readImage(file)).data.buffer);
      let binary = '';
      for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      out.pixels.push(btoa(binary));
    }
  }
  return out;
}
