// The page: load the captioner, caption picked or dropped images one after another, show each caption with its time
// and a ready-to-copy alt attribute. window.prefixcap exposes the captioner and the results (tests read them).
import { Captioner, languageName, tidyAltText } from './caption.js';

const $ = (selector) => document.querySelector(selector);
const status = $('#status');
const results = [];
let captioner;
let lang = 'en'; // the language menu's choice: images added from then on are captioned in it
let queue = Promise.resolve(); // one image at a time: a single wasm thread would only interleave them

window.prefixcap = { results, tidyAltText };

async function main() {
  const graphs = new URLSearchParams(location.search).get('graphs') || undefined; // ?graphs=fp32 or int8
  try {
    captioner = await Captioner.load(new URL('./', document.baseURI), { graphs });
  } catch (error) {
    status.textContent = `Could not load the model: ${error.message}`;
    document.body.dataset.state = 'error';
    throw error;
  }
  window.prefixcap.captioner = captioner;
  const { manifest } = captioner;
  status.textContent = `Ready: ${manifest.system} system, ${captioner.graphs} graphs, onnxruntime-web ` +
    `${manifest.web.runtime.version} (WebAssembly, ${manifest.web.runtime.threads} thread). ` +
    'Images never leave this page.';
  document.body.dataset.state = 'ready';
  // The resize mode, the manifest's until changed (Captioner.resize): images captioned from then on are resized so.
  const resize = $('#resize');
  resize.value = $('#trained').textContent = manifest.image.resize;
  resize.disabled = false;
  resize.addEventListener('change', () => { captioner.resize = resize.value; });
  // The language menu: English (the system's own) and each language of the export, shown only when it has one.
  // Each language's decoder is loaded when an image is first captioned in it (Captioner.session).
  const menu = $('#lang');
  for (const tag of captioner.languages.keys()) {
    const option = document.createElement('option');
    option.value = tag;
    option.textContent = languageName(tag);
    menu.append(option);
  }
  menu.value = lang;
  if (captioner.languages.size) {
    menu.disabled = false;
    $('#languages').hidden = false;
  }
  menu.addEventListener('change', () => { lang = menu.value; });
  $('#files').disabled = false;
}

function add(files) {
  for (const file of files) {
    if (!file.type.startsWith('image/')) continue;
    const card = $('#card').content.firstElementChild.cloneNode(true);
    card.querySelector('img').src = URL.createObjectURL(file);
    card.querySelector('.name').textContent = file.name;
    $('#results').append(card);
    const chosen = lang; // the language when the image was added, whatever is chosen while it waits
    queue = queue.then(() => caption(file, card, chosen));
  }
}

async function caption(file, card, lang) {
  const row = { name: file.name, lang };
  if (captioner.languages.size) card.querySelector('.lang').textContent = ` · ${languageName(lang)}`;
  try {
    const { caption, ids, ms } = await captioner.captionFile(file, { lang });
    Object.assign(row, { caption, ids, ms, alt: tidyAltText(caption) });
    const text = card.querySelector('.caption');
    text.textContent = caption || '(the model wrote an empty caption)';
    text.lang = card.querySelector('.alt').lang = card.querySelector('img').lang = lang; // read out in its language
    card.querySelector('.time').textContent = `${ms.toFixed(1)} ms`;
    card.querySelector('.alt').value = `alt="${escapeAttribute(row.alt)}"`;
    card.querySelector('img').alt = row.alt; // the thumbnail gets its own alt text
    card.querySelector('.copy').disabled = false;
    card.dataset.state = 'done';
  } catch (error) {
    row.error = String(error.message || error);
    card.querySelector('.caption').textContent = `Could not caption this image: ${row.error}`;
    card.dataset.state = 'error';
  }
  results.push(row);
}

function escapeAttribute(text) {
  return text.replaceAll('&', '&amp;').replaceAll('"', '&quot;').replaceAll('<', '&lt;').replaceAll('>', '&gt;');
}

$('#files').addEventListener('change', (event) => add(event.target.files));
const drop = $('#drop');
drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  if (captioner) add(event.dataTransfer.files);
});
$('#results').addEventListener('click', async (event) => {
  if (!event.target.classList.contains('copy')) return;
  const field = event.target.closest('.card').querySelector('.alt');
  try {
    await navigator.clipboard.writeText(field.value);
  } catch { // the clipboard API needs a secure context (https or localhost)
    field.select();
    document.execCommand('copy');
  }
  event.target.textContent = 'Copied';
  setTimeout(() => { event.target.textContent = 'Copy'; }, 1500);
});

main();
