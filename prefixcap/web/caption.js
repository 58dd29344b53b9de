// Captions images in the browser with an export written by `prefixcap export RUN --out DIR --web`.
//
// A port of prefixcap/onnx_captioner.py (OnnxCaptioner), which is the reference: the same preprocessing from
// manifest.json (its resize is PIL's float bicubic, ported below bit for bit), the same greedy decoding with the KV
// cache as the manifest's runtime section says (prefixcap/onnx_spec.py: the graphs run once per image, what the step
// graph is fed and when), and the same text as tokenizers' decode, from the token table the export wrote and checked
// (prefixcap/web_demo.py). Plain ES module, no build step; onnxruntime-web is loaded from the export's ort/ folder.

export class Captioner {
  // base: the export folder's URL; graphs: 'int8' or 'fp32' (default: the export's choice, manifest.web.graphs).
  // The image graphs are loaded here; each step graph (English's, runtime.step, and each language's) when a caption
  // first needs it, so that an export with three languages does not load four decoders up front.
  static async load(base, { graphs } = {}) {
    base = new URL(base);
    const manifest = await fetchJson(new URL('manifest.json', base));
    const web = manifest.web;
    graphs = graphs || web.graphs;
    const key = graphs === 'int8' ? 'int8_file' : 'file';
    // manifest.json is a file anyone can edit: every URL in it is checked before anything is loaded.
    const moduleUrl = exportUrl(base, 'web.runtime.module', web.runtime.module);
    const wasmPaths = exportUrl(base, 'web.runtime.wasm_paths', web.runtime.wasm_paths, { folder: true });
    const tokens = exportUrl(base, 'web.tokens', web.tokens);
    const files = new Map();
    for (const [name, graph] of Object.entries(manifest.graphs)) {
      if (!graph[key]) throw new Error(`this export has no ${graphs} ${name} graph`);
      const data = graph[key] + '.data'; // weights over 1.5 GB live next to the graph (prefixcap/export.py)
      files.set(name, { graph: exportUrl(base, `graphs.${name}.${key}`, graph[key]),
        data: data in manifest.files ? [{ path: data, data: exportUrl(base, `graphs.${name}.${key}`, data) }] : null });
    }
    const runtime = checkRuntime(manifest); // the export checked it all (prefixcap/onnx_spec.py); this, what we read
    const languages = checkLanguages(manifest, runtime);
    const ort = await import(moduleUrl);
    ort.env.wasm.wasmPaths = wasmPaths; // never a CDN
    // More threads need SharedArrayBuffer, which browsers only give cross-origin isolated pages: headers that
    // `python -m http.server` does not send.
    ort.env.wasm.numThreads = web.runtime.threads;
    const table = await fetchJson(tokens);
    const captioner = new Captioner(ort, manifest, files, table, graphs, runtime, languages);
    for (const name of runtime.image) await captioner.session(name);
    return captioner;
  }

  // files: graph name -> { graph: URL, data: external data or null }, what session() loads; languages: tag -> step
  // graph (checkLanguages).
  // files may instead be an object of sessions already created (graph name -> session), as callers before lazy
  // loading passed them.
  constructor(ort, manifest, files, table, graphs, runtime, languages = new Map()) {
    const preloaded = files instanceof Map ? {} : { ...files };
    files = files instanceof Map ? files : new Map();
    Object.assign(this, { ort, manifest, files, table, graphs, runtime, languages });
    this.tokens = manifest.tokens;
    this.skip = new Set(table.skip);
    this.sessions = preloaded; // graph name -> its session, once loaded
    // graph name -> the promise of its session (a preloaded one's is already settled)
    this.loading = new Map(Object.entries(preloaded).map(([name, session]) => [name, Promise.resolve(session)]));
    this.caches = new Map(); // step graph name -> its cache (cacheOf)
    this.lang = 'en'; // the language captions are written in unless a call says otherwise
  }

  // The graph's onnxruntime session, created on the first call (later calls share it; a failed load is tried again).
  session(name) {
    if (!this.loading.has(name)) {
      const { graph, data } = this.files.get(name);
      const options = { executionProviders: ['wasm'], graphOptimizationLevel: 'all' }; // onnxruntime's default
      if (data) options.externalData = data;
      const loading = this.ort.InferenceSession.create(graph, options).then((session) => {
        this.sessions[name] = session;
        return session;
      });
      loading.catch(() => this.loading.delete(name));
      this.loading.set(name, loading);
    }
    return this.loading.get(name);
  }

  // The step graph that writes captions in lang: runtime.step for English ('en', or none), else the language's.
  stepGraph(lang) {
    if (lang == null || lang === 'en') return this.runtime.step;
    const graph = this.languages.get(lang);
    if (!graph) {
      throw new Error(`this export has no ${JSON.stringify(lang)} language (it has: ` +
        `${[...this.languages.keys()].join(', ') || 'none'}; English is the system's own)`);
    }
    return graph;
  }

  // A step graph's cache: each past input and the present output it comes back as (Runtime.cache_names).
  cacheOf(graph) {
    if (!this.caches.has(graph)) {
      const { past, present } = this.runtime.cache;
      const other = new Set(['input_ids', 'attention_mask', ...this.runtime.every_step,
        ...Object.keys(this.runtime.first_step)]);
      this.caches.set(graph, new Map(this.manifest.graphs[graph].inputs.map((v) => v.name)
        .filter((name) => name.startsWith(past) && !other.has(name))
        .map((name) => [name, present + name.slice(past.length)])));
    }
    return this.caches.get(graph);
  }

  // One image file -> { caption, ids, ms, lang }: ms counts preprocessing, the graphs and decoding, not reading the
  // file nor loading a step graph used for the first time. lang: 'en' (the system's own) or one of this.languages;
  // default this.lang.
  async captionFile(file, { lang = this.lang } = {}) {
    await this.session(this.stepGraph(lang)); // refuses an unknown language before the image is read
    const image = await readImage(file);
    const start = performance.now();
    const ids = await this.generate(this.pixelValues(image), undefined, lang);
    const caption = this.decode(ids);
    return { caption, ids, ms: performance.now() - start, lang: lang ?? 'en' };
  }

  // (1, 3, S, S) float32, as OnnxCaptioner._pixels makes them: RGB / 255, resized if not already at the size
  // (squash; shortest edge to size / crop_pct then the centre; or letterbox: longest edge to size, centred on the fill
  // colour, the odd pixel of padding below and right), clamped to [0, 1], normalised. The mode is this.resize when
  // set (the page's menu), else the manifest's.
  pixelValues({ rgba, width: w, height: h }) {
    const spec = this.manifest.image;
    const size = spec.size;
    const mode = this.resize || spec.resize;
    const scaled = Math.floor(size / spec.crop_pct);
    let nh, nw;
    if (mode === 'letterbox') {
      const scale = size / Math.max(h, w);
      nh = Math.max(1, Math.min(size, pyRound(h * scale)));
      nw = Math.max(1, Math.min(size, pyRound(w * scale)));
    } else if (mode === 'squash') {
      nh = nw = scaled;
    } else {
      const scale = scaled / Math.min(h, w);
      nh = Math.max(scaled, pyRound(h * scale));
      nw = Math.max(scaled, pyRound(w * scale));
    }
    // letterbox: where the resized image starts in the input (negated); the others: where the input starts in it
    const top = mode === 'letterbox' ? -Math.floor((size - nh) / 2) : Math.floor((nh - size) / 2);
    const left = mode === 'letterbox' ? -Math.floor((size - nw) / 2) : Math.floor((nw - size) / 2);
    const fill = spec.fill || spec.mean; // an export of another mode records no fill: the mean, as Python's
    const out = new Float32Array(3 * size * size);
    for (let c = 0; c < 3; c++) {
      let plane = new Float32Array(w * h);
      for (let i = 0; i < w * h; i++) plane[i] = rgba[4 * i + c] / 255; // float32 of v / 255, as numpy's
      if (nh !== h || nw !== w) plane = resizeBicubic(plane, w, h, nw, nh);
      const mean = Math.fround(spec.mean[c]);
      const std = Math.fround(spec.std[c]);
      const padding = Math.fround(fill[c]);
      for (let y = 0; y < size; y++) {
        for (let x = 0; x < size; x++) {
          const [sy, sx] = [top + y, left + x];
          const inside = sy >= 0 && sy < nh && sx >= 0 && sx < nw; // always, but for letterbox's padding
          const v = inside ? Math.min(Math.max(plane[sy * nw + sx], 0), 1) : padding;
          out[(c * size + y) * size + x] = Math.fround(v - mean) / std; // stored as float32, as numpy rounds
        }
      }
    }
    return new this.ort.Tensor('float32', out, [1, 3, size, size]);
  }

  // Greedy ids up to and including EOS (OnnxCaptioner.generate for one image), in lang (default this.lang).
  async generate(pixelValues, maxNewTokens, lang = this.lang) {
    const graph = this.stepGraph(lang);
    const limit = maxNewTokens || this.manifest.generate.max_new_tokens;
    const ids = [];
    let [logits, feed] = await this.start(pixelValues, graph);
    for (let step = 0; step < limit; step++) {
      const next = argmax(logits.data);
      ids.push(next);
      if (next === this.tokens.eos_id || step === limit - 1) break;
      [logits, feed] = await this.step(feed, [next], graph);
    }
    return ids;
  }

  // The image graphs, then the first step of the step graph (with the prompt ids): logits of the first caption
  // token, and what the next step feeds.
  async start(pixelValues, graph = this.runtime.step) {
    const runtime = this.runtime;
    const given = { pixel_values: pixelValues };
    for (const name of runtime.image) Object.assign(given, await this.run(name, given));
    const feed = {};
    for (const name of [...runtime.every_step, ...Object.keys(runtime.first_step)]) feed[name] = given[name];
    const axis = runtime.cache.length_axis;
    const cache = this.cacheOf(graph);
    for (const value of this.manifest.graphs[graph].inputs) {
      if (cache.has(value.name)) { // an empty past: the batch, length 0, the other dims as declared
        const shape = value.shape.map((d, i) => (i === 0 ? 1 : i === axis ? 0 : d));
        feed[value.name] = this.tensor(value.dtype, [], shape);
      }
    }
    return this.step(feed, this.tokens.prompt_ids, graph);
  }

  // One step of the step graph: ids after the cached past -> [logits (1, V), the next step's feed].
  async step(feed, ids, graph = this.runtime.step) {
    const runtime = this.runtime;
    const cache = this.cacheOf(graph);
    const past = feed[cache.keys().next().value].dims[runtime.cache.length_axis];
    let first = 0; // the first-step inputs' lengths: 0 after the first step
    for (const [name, axis] of Object.entries(runtime.first_step)) first += feed[name].dims[axis];
    const total = past + first + ids.length;
    const inputIds = this.tensor('int64', ids.map(BigInt), [1, ids.length]);
    const mask = this.tensor('int64', Array(total).fill(1n), [1, total]);
    const outputs = await this.run(graph, { ...feed, input_ids: inputIds, attention_mask: mask });
    const next = { ...feed };
    for (const [name, present] of cache) next[name] = outputs[present];
    for (const [name, axis] of Object.entries(runtime.first_step)) { // in the cache now
      next[name] = this.tensor(feed[name].type, [], feed[name].dims.map((d, i) => (i === axis ? 0 : d)));
    }
    return [outputs.logits, next];
  }

  async run(graph, feed) {
    const session = this.sessions[graph] || await this.session(graph);
    return session.run(Object.fromEntries(session.inputNames.map((name) => [name, feed[name]])));
  }

  tensor(dtype, values, dims) {
    const arrays = { float32: Float32Array, int64: BigInt64Array };
    return new this.ort.Tensor(dtype, arrays[dtype].from(values), dims);
  }

  // Token ids -> text, as OnnxCaptioner.caption decodes (prefixcap/web_demo.py: decode_like_js is this, in Python).
  decode(ids) {
    const t = this.table;
    const pieces = ids.filter((id) => !this.skip.has(id) && t.pieces[id] != null).map((id) => t.pieces[id]);
    let text;
    if (t.decoder === 'byte-level') {
      const bytes = pieces.flatMap(pieceBytes);
      // Invalid UTF-8 becomes U+FFFD as in tokenizers (and Python's errors='replace'); a BOM is text, not dropped.
      text = new TextDecoder('utf-8', { ignoreBOM: true }).decode(new Uint8Array(bytes));
    } else if (t.decoder === 'metaspace') {
      text = pieces.map((p, i) => p.replaceAll(t.replacement, i === 0 && t.prepend ? '' : ' ')).join('');
    } else {
      text = pieces.join(' ');
    }
    for (const [old, replacement] of t.clean_ups) text = text.replaceAll(old, replacement);
    return stripChars(text, t.strip);
  }
}

// The file's pixels as RGBA bytes, upright as its EXIF orientation says, transparency composited over white, colours
// as stored (prefixcap/images.py: open_image and to_rgb).
export async function readImage(file) {
  const bitmap = await createImageBitmap(file, {
    colorSpaceConversion: 'none', premultiplyAlpha: 'none', imageOrientation: 'from-image',
  });
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext('2d', { willReadFrequently: true });
  // Drawn over an opaque white canvas: round(c * a / 255) + 255 - a per channel, which is also what PIL's
  // alpha_composite over white computes; reading a transparent canvas back would lose colour to premultiplication.
  context.fillStyle = '#ffffff';
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { rgba: context.getImageData(0, 0, width, height).data, width, height };
}

// PIL's Image.resize(..., BICUBIC) of a float ('F' mode) image, as libImaging/Resample.c computes it: separable,
// each output a float32 sum in double precision of float32 inputs times normalised double weights of the a = -0.5
// cubic, whose support widens by the scale factor when downscaling (antialiasing). The order of the two passes
// changes the last bits; this is Pillow 13's: vertical first when the height shrinks by more than twice as many
// pixels as the width (Pillow 12 and older always went horizontal first).
export function resizeBicubic(src, w, h, nw, nh) {
  const horizontalFirst = !(h - nh > 0 && h - nh > (w - nw) * 2);
  let image = src;
  let width = w;
  const horizontal = () => {
    if (nw === w) return;
    const rows = image.length / width;
    const { bounds, weights, ksize } = coefficients(w, nw);
    const out = new Float32Array(nw * rows);
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < nw; x++) {
        const [xmin, n] = [bounds[2 * x], bounds[2 * x + 1]];
        let sum = 0;
        for (let k = 0; k < n; k++) sum += image[y * w + xmin + k] * weights[x * ksize + k];
        out[y * nw + x] = sum;
      }
    }
    [image, width] = [out, nw];
  };
  const vertical = () => {
    if (nh === h) return;
    const { bounds, weights, ksize } = coefficients(h, nh);
    const out = new Float32Array(width * nh);
    for (let y = 0; y < nh; y++) {
      const [ymin, n] = [bounds[2 * y], bounds[2 * y + 1]];
      for (let x = 0; x < width; x++) {
        let sum = 0;
        for (let k = 0; k < n; k++) sum += image[(ymin + k) * width + x] * weights[y * ksize + k];
        out[y * width + x] = sum;
      }
    }
    image = out;
  };
  if (horizontalFirst) {
    horizontal();
    vertical();
  } else {
    vertical();
    horizontal();
  }
  return image;
}

// Resample.c's precompute_coeffs for the whole input (box 0..inSize): each output's first input and count, and its
// weights (ksize per output).
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 2 * filterScale; // the bicubic filter's support is 2
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0); // C's (int) truncates
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const ss = 1 / filterScale; // multiplied, not divided by: the last bit matters
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const weight = bicubic((x + xmin - center + 0.5) * ss);
      weights[xx * ksize + x] = weight;
      total += weight;
    }
    if (total !== 0) for (let x = 0; x < xmax; x++) weights[xx * ksize + x] /= total;
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// Python's round(): halves to even.
function pyRound(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function argmax(values) { // the first of equal maxima, as numpy's
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// Byte-level BPE writes each byte as a printable character (GPT-2's bytes_to_unicode); character -> byte.
const BYTE_OF = (() => {
  const printable = (b) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const map = new Map();
  let extra = 0;
  for (let b = 0; b < 256; b++) map.set(String.fromCodePoint(printable(b) ? b : 256 + extra++), b);
  return map;
})();

// A token's bytes; one with a character outside the byte alphabet (an added token) is read as UTF-8 text.
function pieceBytes(piece) {
  const chars = Array.from(piece);
  if (chars.every((c) => BYTE_OF.has(c))) return chars.map((c) => BYTE_OF.get(c));
  return Array.from(new TextEncoder().encode(piece));
}

// str.strip(chars): JS's trim() strips other characters than Python's str.strip() does.
export function stripChars(text, chars) {
  const chars_ = Array.from(text);
  let [start, end] = [0, chars_.length];
  while (start < end && chars.includes(chars_[start])) start++;
  while (end > start && chars.includes(chars_[end - 1])) end--;
  return chars_.slice(start, end).join('');
}

// prefixcap.caption.tidy_alt_text: no leading "an image of", a capital first, one closing full stop, at most
// maxChars characters cut at a word boundary. Python counts code points, so this works on arrays of them.
const FILLER = /^(?:(?:this|it) is +)?(?:(?:an?|the|this) +)?(?:close-up +)?(?:image|picture|pic|photo|photograph|illustration|graphic) +(?:of|showing|depicting|that shows) +/iu;
const ENDINGS = ['.', '?', '!'];
const DANGLING = ',;:-–— ';
const LEADING_ON = new Set(['a', 'an', 'the', 'and', 'or', 'of', 'with', 'in', 'on', 'at', 'to', 'by', 'for', 'from']);
// What Python's str.isspace() calls whitespace (str.split() splits there).
const PY_WHITESPACE = '\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000';

export function tidyAltText(text, maxChars = 125) {
  // After the split/join only single spaces are left, so the filler's \s (in Python) can only meet a space.
  text = Array.from(text).reduce((words, c) => {
    if (PY_WHITESPACE.includes(c)) words.push(''); else words[words.length - 1] += c;
    return words;
  }, ['']).filter((w) => w).join(' ');
  let filler;
  while ((filler = FILLER.exec(text)) && filler[0].length < text.length) text = text.slice(filler[0].length);
  let chars = Array.from(text);
  const ends = (cs) => cs.length > 0 && ENDINGS.includes(cs[cs.length - 1]);
  if (maxChars != null && chars.length > maxChars - (ends(chars) ? 0 : 1)) {
    const space = chars.slice(0, maxChars).lastIndexOf(' ');
    if (space > 0) {
      const words = chars.slice(0, space).join('').split(' ');
      while (words.length > 1 && LEADING_ON.has(words[words.length - 1].toLowerCase())) words.pop();
      chars = Array.from(words.join(' '));
    } else {
      chars = chars.slice(0, maxChars - 1);
    }
  }
  while (chars.length && DANGLING.includes(chars[chars.length - 1])) chars.pop();
  if (!chars.length) return '';
  chars[0] = chars[0].toUpperCase();
  return ends(chars) ? chars.join('') : chars.join('') + '.';
}

// The URL of a file that manifest.json names (field: where, for the error), which must be in the export folder
// (base): a relative path of plain file-name characters, without a scheme (data:, http:, blob:, javascript:), a
// leading / or //, a backslash, a . or .. segment, a query or a fragment, that resolves under base. folder: a folder's
// path, ending in / (onnxruntime-web's wasmPaths). Anything else is refused: an edited manifest must not make the
// page load code or data from anywhere else.
export function exportUrl(base, field, path, { folder = false } = {}) {
  const segments = typeof path === 'string' ? path.split('/') : [];
  if (folder && segments.at(-1) === '') segments.pop();
  const url = typeof path === 'string' && /^[A-Za-z0-9._\/-]+$/.test(path) ? new URL(path, base) : null;
  if (!url || !segments.length || segments.some((s) => s === '' || s === '.' || s === '..') ||
      folder !== path.endsWith('/') || url.origin !== base.origin || !url.href.startsWith(base.href) ||
      url.search || url.hash) {
    throw new Error(`manifest.json is refused: ${field} is ${JSON.stringify(path)}, not a relative path to a ` +
      `${folder ? 'folder' : 'file'} inside the export folder (the page loads nothing from anywhere else)`);
  }
  return url.href;
}

// The manifest's runtime section, if every graph it names is one of the manifest's graphs (an export written before
// prefixcap-onnx/2 has none: its page came with it, and a page of this version needs the export made again).
function checkRuntime(manifest) {
  const runtime = manifest.runtime;
  if (!runtime || !Array.isArray(runtime.image) || !runtime.cache) {
    throw new Error(`manifest.json has no runtime section (format ${manifest.format}): export the model again`);
  }
  for (const name of [...runtime.image, runtime.step]) {
    if (!Object.hasOwn(manifest.graphs, name)) throw new Error(`manifest.json's runtime names no graph ${name}`);
  }
  return runtime;
}

// A language tag as prefixcap.languages writes them: "de", "fr", "pt-br" (lower case; "en" is English, no adapter).
export const LANGUAGE_TAG = /^[a-z]{2,3}(-[a-z0-9]{2,8})?$/;
const LANGUAGE_NAMES = { en: 'English', de: 'Deutsch', fr: 'Français', ru: 'Русский' };

// What the page's language menu calls a language: its own name for the ones it knows, else the tag.
export function languageName(tag) {
  return Object.hasOwn(LANGUAGE_NAMES, tag) ? LANGUAGE_NAMES[tag] : tag;
}

// The manifest's languages (tag -> the step graph that captions in it, in place of runtime.step; none in an export
// written before languages) as a Map, without any that is not a language tag or whose graph is not a step graph of
// this manifest (one of its graphs, no image graph, with the inputs and outputs of runtime.step's): those are left
// out with a warning, since manifest.json is a file from anyone and a tag becomes a menu entry.
export function checkLanguages(manifest, runtime, warn = console.warn) {
  const languages = new Map();
  const given = manifest.languages ?? {};
  if (typeof given !== 'object' || Array.isArray(given)) {
    warn(`manifest.json's languages are ignored: ${JSON.stringify(given)} is not an object of tag: graph`);
    return languages;
  }
  const names = (values) => JSON.stringify((Array.isArray(values) ? values : []).map((v) => v?.name).sort());
  const step = manifest.graphs[runtime.step];
  for (const [tag, graph] of Object.entries(given)) {
    let problem = null;
    if (!LANGUAGE_TAG.test(tag) || tag === 'en') {
      problem = 'is no language tag like de, fr or pt-br (en is the system\'s own)';
    } else if (typeof graph !== 'string' || !Object.hasOwn(manifest.graphs, graph)) {
      problem = `names no graph of this export (${JSON.stringify(graph)})`;
    } else if (runtime.image.includes(graph)) {
      problem = `names an image graph (${graph}), not a step graph`;
    } else if (names(manifest.graphs[graph].inputs) !== names(step.inputs) ||
               names(manifest.graphs[graph].outputs) !== names(step.outputs)) {
      problem = `names graph ${graph}, whose inputs or outputs are not those of ${runtime.step}`;
    }
    if (problem) warn(`manifest.json's language ${JSON.stringify(tag)} is ignored: it ${problem}`);
    else languages.set(tag, graph);
  }
  return languages;
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return response.json();
}
