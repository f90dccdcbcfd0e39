//! The w and H histograms as a small PNG (`prepare --plot`), written by hand: an RGB image,
//! zlib-compressed scanlines, CRC-checked chunks. No font: the numbers are in the terminal
//! histogram printed beside it; the image shows the shapes.

use std::io::Write;

const W: usize = 640;
const H: usize = 280;
const MARGIN: usize = 20;

/// Draws each histogram (counts per bin) as a panel of bars, side by side.
pub fn histograms_png(panels: &[(&[usize], [u8; 3])]) -> Vec<u8> {
    let mut px = vec![255u8; W * H * 3];
    let mut fill = |x0: usize, y0: usize, x1: usize, y1: usize, rgb: [u8; 3]| {
        for y in y0..y1.min(H) {
            for x in x0..x1.min(W) {
                px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&rgb);
            }
        }
    };
    let n = panels.len().max(1);
    let panel_w = W / n;
    for (p, (counts, rgb)) in panels.iter().enumerate() {
        let x0 = p * panel_w + MARGIN;
        let x1 = (p + 1) * panel_w - MARGIN;
        let (top, bottom) = (MARGIN, H - MARGIN);
        // Axes.
        fill(x0, bottom, x1, bottom + 2, [0, 0, 0]);
        fill(x0, top, x0 + 2, bottom + 2, [0, 0, 0]);
        let max = counts.iter().copied().max().unwrap_or(0).max(1);
        let bins = counts.len().max(1);
        let bw = (x1 - x0 - 4) / bins;
        for (i, &c) in counts.iter().enumerate() {
            let h = (bottom - top) * c / max;
            let bx = x0 + 4 + i * bw;
            fill(bx, bottom - h, bx + bw.saturating_sub(2), bottom, *rgb);
        }
    }
    encode_rgb(W, H, &px)
}

/// A minimal PNG encoder: 8-bit RGB, no filtering.
pub fn encode_rgb(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", vec![])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(&data);
        out.extend_from_slice(kind);
        out.extend_from_slice(&data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_png_has_valid_chunks_and_decompresses_to_the_image() {
        let png = histograms_png(&[(&[1, 5, 2], [200, 40, 40]), (&[0, 0, 3], [40, 40, 200])]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut pos = 8;
        let mut idat = vec![];
        let mut kinds = vec![];
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc);
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            pos += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        let mut raw = vec![];
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), (W * 3 + 1) * H);
        // Some pixels carry each panel's colour.
        assert!(raw.windows(3).any(|p| p == [200, 40, 40]));
        assert!(raw.windows(3).any(|p| p == [40, 40, 200]));
    }
}
