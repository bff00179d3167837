// Reads the PNG screenshots Chromium writes, and checks that one shows something.
//
// decodePng handles what Chromium writes: bit depth 8, colour type 2 (RGB) or 6 (RGBA),
// not interlaced; anything else is an error, not a guess. No dependencies but node:zlib.
import zlib from 'node:zlib';

const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** Decodes `buf` into {width, height, rgba}: 4 bytes per pixel, rows top to bottom. */
export function decodePng(buf) {
  if (buf.length < 8 || !buf.subarray(0, 8).equals(SIGNATURE)) throw new Error('not a PNG (bad signature)');
  let off = 8;
  let header;
  const idat = [];
  while (off + 8 <= buf.length) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString('latin1', off + 4, off + 8);
    const data = buf.subarray(off + 8, off + 8 + len);
    if (data.length !== len) throw new Error(`PNG chunk ${type} is truncated`);
    off += 12 + len; // length, type, data, CRC
    if (type === 'IHDR') {
      header = {
        width: data.readUInt32BE(0),
        height: data.readUInt32BE(4),
        depth: data[8],
        colourType: data[9],
        interlace: data[12],
      };
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
  }
  if (!header) throw new Error('PNG has no IHDR chunk');
  const { width, height, depth, colourType, interlace } = header;
  const channels = { 2: 3, 6: 4 }[colourType];
  if (depth !== 8 || !channels || interlace !== 0) {
    throw new Error(`unsupported PNG: bit depth ${depth}, colour type ${colourType}, interlace ${interlace} (want 8-bit RGB or RGBA, not interlaced)`);
  }
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  if (raw.length !== height * (stride + 1)) throw new Error(`PNG data has ${raw.length} bytes, want ${height * (stride + 1)}`);
  const rgba = Buffer.alloc(width * height * 4);
  let prev = Buffer.alloc(stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = Buffer.from(raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1)));
    unfilter(filter, line, prev, channels);
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 4;
      rgba[o] = line[x * channels];
      rgba[o + 1] = line[x * channels + 1];
      rgba[o + 2] = line[x * channels + 2];
      rgba[o + 3] = channels === 4 ? line[x * channels + 3] : 255;
    }
    prev = line;
  }
  return { width, height, rgba };
}

// Undoes one scanline's filter in place (PNG spec, section 9).
function unfilter(filter, line, prev, bpp) {
  for (let i = 0; i < line.length; i++) {
    const a = i >= bpp ? line[i - bpp] : 0;
    const b = prev[i];
    const c = i >= bpp ? prev[i - bpp] : 0;
    let add;
    switch (filter) {
      case 0: add = 0; break;
      case 1: add = a; break;
      case 2: add = b; break;
      case 3: add = (a + b) >> 1; break;
      case 4: {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        add = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        break;
      }
      default: throw new Error(`PNG scanline filter ${filter} is invalid`);
    }
    line[i] = (line[i] + add) & 0xff;
  }
}

const pixel = (img, x, y) => img.rgba.readUInt32BE((y * img.width + x) * 4);

/**
 * {width, height, colours, background, ink}: the number of distinct colours, the most
 * common colour (as "#rrggbbaa") and the share of pixels (0..1) that differ from it.
 */
export function imageStats(img) {
  const counts = new Map();
  for (let i = 0; i < img.width * img.height; i++) {
    const p = img.rgba.readUInt32BE(i * 4);
    counts.set(p, (counts.get(p) ?? 0) + 1);
  }
  let background = 0;
  let most = -1;
  for (const [p, n] of counts) if (n > most) [background, most] = [p, n];
  const total = img.width * img.height;
  return {
    width: img.width,
    height: img.height,
    colours: counts.size,
    background: `#${background.toString(16).padStart(8, '0')}`,
    backgroundPixel: background,
    ink: total ? (total - most) / total : 0,
  };
}

/** How many pixels inside `box` ({x, y, width, height}, in pixels) differ from `background`. */
export function inkIn(img, box, background) {
  const x0 = Math.max(0, Math.floor(box.x));
  const y0 = Math.max(0, Math.floor(box.y));
  const x1 = Math.min(img.width, Math.ceil(box.x + box.width));
  const y1 = Math.min(img.height, Math.ceil(box.y + box.height));
  let n = 0;
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) if (pixel(img, x, y) !== background) n++;
  return n;
}

/**
 * Throws unless the screenshot `png` shows something: at least `minColours` distinct
 * colours and at least `minInk` of its pixels differing from the background, and, for
 * each {selector, box, ink} in `elements`, a box of non-zero size lying inside the image
 * and, unless `ink` is false, with at least one pixel in it differing from the background
 * (the element drew something).
 * Returns the image's stats.
 */
export function checkScreenshot(png, elements = [], { minColours = 2, minInk = 0.001, what = 'screenshot' } = {}) {
  const img = decodePng(png);
  const stats = imageStats(img);
  if (stats.colours < minColours || stats.ink < minInk) {
    throw new Error(`${what} looks blank: ${stats.colours} colours, ${(stats.ink * 100).toFixed(3)}% of pixels differ from the background ${stats.background}`);
  }
  for (const { selector, box, ink = true } of elements) {
    if (!box || !(box.width > 0) || !(box.height > 0)) throw new Error(`${what}: ${selector} has no size (${JSON.stringify(box)})`);
    if (box.x < 0 || box.y < 0 || box.x + box.width > img.width || box.y + box.height > img.height) {
      throw new Error(`${what}: ${selector} at ${JSON.stringify(box)} is outside the ${img.width}x${img.height} image`);
    }
    if (ink && inkIn(img, box, stats.backgroundPixel) === 0) throw new Error(`${what}: ${selector} at ${JSON.stringify(box)} shows nothing (every pixel is the background)`);
  }
  const { backgroundPixel: _, ...rest } = stats;
  return rest;
}
