"`data.read_radiograph` on real images in every odd form we expect, and on bad files made from them"
import io, struct, zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from cxr_covid_nbdev.data import UnreadableImage, read_radiograph


@pytest.fixture(scope='module')
def real_img(cxr_real):
    "A real COVID-19 film of the sample, as stored (8-bit JPEG) and decoded"
    m = pd.read_csv(cxr_real/'manifest.csv', keep_default_na=False)
    p = cxr_real/m.path[m.label == 'COVID-19'].iloc[3]
    return p, Image.open(p).convert('L')


def arr(im): return np.asarray(im, dtype=np.float64)


def png_bytes(im, **kw):
    b = io.BytesIO(); im.save(b, 'PNG', **kw); return b.getvalue()


def jpeg_bytes(im, **kw):
    b = io.BytesIO(); im.save(b, 'JPEG', **kw); return b.getvalue()


def test_path_and_bytes_agree(real_img):
    p, im = real_img
    a, b = read_radiograph(p), read_radiograph(p.read_bytes())
    assert a.mode == 'L' and b.mode == 'L'
    assert np.array_equal(arr(a), arr(im)) and np.array_equal(arr(a), arr(b))


def test_16bit_png_is_min_max_scaled(real_img):
    _, im = real_img
    a = arr(im)
    a16 = (a * 180 + 3000).astype(np.uint16)  # a 16-bit film using part of the range
    data = png_bytes(Image.fromarray(a16))
    assert Image.open(io.BytesIO(data)).mode.startswith('I')
    got = arr(read_radiograph(data, name='x16.png'))
    want = np.round((a - a.min()) / (a.max() - a.min()) * 255)
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize('mode', ['RGBA', 'LA'])
def test_alpha_is_composited_on_black(real_img, mode):
    _, im = real_img
    alpha = np.zeros(im.size[::-1], np.uint8); alpha[:, : im.width // 2] = 255
    src = Image.merge('LA', (im, Image.fromarray(alpha)))
    got = arr(read_radiograph(png_bytes(src.convert(mode)), name=f'x.{mode}.png'))
    assert np.abs(got[:, : im.width // 2] - arr(im)[:, : im.width // 2]).max() <= 1
    assert got[:, im.width // 2 + 1:].max() == 0


def test_palette_and_cmyk_and_rgb(real_img):
    _, im = real_img
    pal = read_radiograph(png_bytes(im.convert('P', palette=Image.ADAPTIVE, colors=256)), name='p.png')
    cmyk_data = jpeg_bytes(im.convert('RGB').convert('CMYK'), quality=95)
    assert Image.open(io.BytesIO(cmyk_data)).mode == 'CMYK'
    cmyk = read_radiograph(cmyk_data, name='cmyk.jpg')
    rgb = read_radiograph(png_bytes(im.convert('RGB')), name='rgb.png')
    for got in (pal, cmyk, rgb):
        assert got.mode == 'L' and got.size == im.size
        assert np.abs(arr(got) - arr(im)).mean() < 3


def test_float_and_int32(real_img):
    _, im = real_img
    for a in ((arr(im) * 1000 - 5).astype(np.int32), (arr(im) / 255 - 0.5).astype(np.float32)):
        b = io.BytesIO(); Image.fromarray(a).save(b, 'TIFF')
        got = arr(read_radiograph(b.getvalue(), name='x.tif'))
        assert np.abs(got - arr(im)).max() <= 1


def test_exif_orientation_applied(real_img):
    _, im = real_img
    exif = Image.Exif(); exif[0x0112] = 6  # stored rotated: the viewer must turn it 90° clockwise
    stored = im.transpose(Image.Transpose.ROTATE_90)
    got = read_radiograph(jpeg_bytes(stored, quality=95, exif=exif.tobytes()), name='rot.jpg')
    assert got.size == im.size
    assert np.abs(arr(got) - arr(im)).mean() < 3


def test_bad_files(real_img, tmp_path):
    p, im = real_img
    data = p.read_bytes()
    (tmp_path/'zero.png').write_bytes(b'')
    (tmp_path/'text.png').write_text('this is not an image, just text with a png name\n')
    (tmp_path/'cut.jpg').write_bytes(data[: len(data) // 2])
    (tmp_path/'cut.png').write_bytes(png_bytes(im)[:-2000])
    cases = {'zero.png': 'empty file', 'text.png': 'not an image', 'cut.jpg': 'truncated', 'cut.png': 'truncated',
             'missing.png': 'no such file'}
    for name, reason in cases.items():
        with pytest.raises(UnreadableImage, match=reason): read_radiograph(tmp_path/name)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert issubclass(UnreadableImage, ValueError)


def test_decompression_bomb(real_img, monkeypatch):
    _, im = real_img
    # a real PNG whose header claims 40000×40000 pixels (CRC fixed): Pillow refuses it on open
    data = bytearray(png_bytes(im))
    assert data[12:16] == b'IHDR'
    data[16:24] = struct.pack('>II', 40000, 40000)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
    with pytest.raises(UnreadableImage, match='decompression bomb'): read_radiograph(bytes(data), name='bomb.png')
    # between the limit and twice the limit Pillow only warns: that is an error here too
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', im.width * im.height - 1)
    with pytest.raises(UnreadableImage, match='decompression bomb'): read_radiograph(png_bytes(im), name='big.png')


# --- DICOM ---------------------------------------------------------------------------------------

def test_real_cr_chest(dicom_file):
    import pydicom
    unc = read_radiograph(dicom_file('RG1_UNCI.dcm'))
    j2k = read_radiograph(dicom_file('RG1_J2KR.dcm'))
    assert unc.mode == 'L' and unc.size == (1841, 1955)
    assert np.abs(arr(unc) - arr(j2k)).mean() < 1
    raw = pydicom.dcmread(dicom_file('RG1_UNCI.dcm')).pixel_array.astype(np.float64)
    # MONOCHROME1: high stored values are dark, so the image is anti-correlated with the raw values
    assert np.corrcoef(raw.ravel()[::97], arr(unc).ravel()[::97])[0, 1] < -0.9
    assert 20 < arr(unc).mean() < 235


def test_tibia_is_readable(dicom_file):
    im = read_radiograph(dicom_file('RG3_UNCI.dcm'))
    assert im.mode == 'L' and im.size == (1760, 1760) and arr(im).std() > 10


def test_real_jpeg_ls_and_lossless_jpeg(dicom_file, tmp_path):
    import pydicom
    ls = read_radiograph(dicom_file('JPEGLSNearLossless_16.dcm'))
    assert ls.mode == 'L' and arr(ls).std() > 1
    ds = pydicom.dcmread(dicom_file('JPEG-LL.dcm'))  # a real lossless-JPEG file; NM, so relabel it
    ds.Modality = 'OT'
    ds.save_as(tmp_path/'ll.dcm')
    im = read_radiograph(tmp_path/'ll.dcm')
    assert im.size == (ds.Columns, ds.Rows) and arr(im).std() > 1
    with pytest.raises(UnreadableImage, match='modality NM'): read_radiograph(dicom_file('JPEG-LL.dcm'))


def make_dicom(im, modality='DX', frames=1, photometric='MONOCHROME2', pixels=True, slope=None, intercept=None,
               window=None):
    "A DICOM dataset holding the real image `im` as 12-bit values"
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid, SecondaryCaptureImageStorage
    a = (arr(im) * 16).astype(np.uint16)
    if photometric == 'MONOCHROME1': a = 4095 - a
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, 'TEST'
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None: ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, 'US'
    if window is not None: ds.WindowCenter, ds.WindowWidth = window
    if frames > 1: ds.NumberOfFrames = frames
    if pixels: ds.PixelData = np.concatenate([a] * frames).tobytes()
    return ds


def dicom_bytes(ds, preamble=True):
    b = io.BytesIO(); ds.save_as(b, enforce_file_format=preamble); return b.getvalue()


def test_dicom_made_from_real_image(real_img):
    _, im = real_img
    for kw in (dict(), dict(photometric='MONOCHROME1'), dict(slope=2, intercept=-1000), dict(modality='CR')):
        got = read_radiograph(dicom_bytes(make_dicom(im, **kw)), name='x')
        assert got.size == im.size
        want = (arr(im) - arr(im).min()) / (arr(im).max() - arr(im).min()) * 255
        assert np.abs(arr(got) - want).max() <= 1.5, kw
    # a window maps [c - w/2, c + w/2] to black..white: values below are clipped black
    got = arr(read_radiograph(dicom_bytes(make_dicom(im, window=(3000, 2000))), name='w'))
    a12 = arr(im) * 16
    below, above = a12 < 1990, a12 > 4010
    assert below.any() and got[below].max() <= 1
    assert not above.any() or got[above].min() >= 254
    assert np.corrcoef(got[a12 > 2100], a12[a12 > 2100])[0, 1] > 0.99


def test_dicom_without_preamble_detected_by_name(real_img):
    _, im = real_img
    data = dicom_bytes(make_dicom(im), preamble=False)
    assert data[128:132] != b'DICM'
    assert read_radiograph(data, name='scan.dcm').size == im.size
    with pytest.raises(UnreadableImage): read_radiograph(data, name='scan.png')


def test_compressed_dicom_from_real_image(real_img):
    from pydicom.uid import RLELossless, JPEG2000Lossless
    _, im = real_img
    plain = arr(read_radiograph(dicom_bytes(make_dicom(im)), name='p.dcm'))
    for ts in (RLELossless, JPEG2000Lossless):
        ds = make_dicom(im); ds.compress(ts)
        assert ds.file_meta.TransferSyntaxUID == ts
        assert np.array_equal(arr(read_radiograph(dicom_bytes(ds), name='c.dcm')), plain), ts.name


def test_bad_dicom(real_img):
    _, im = real_img
    cases = [(make_dicom(im, frames=3), 'multi-frame'), (make_dicom(im, modality='CT'), 'modality CT'),
             (make_dicom(im, modality='US'), 'modality US'), (make_dicom(im, pixels=False), 'no pixel data')]
    for ds, reason in cases:
        with pytest.raises(UnreadableImage, match=reason): read_radiograph(dicom_bytes(ds), name='bad.dcm')
    # a DICOM file cut in the pixel data
    data = dicom_bytes(make_dicom(im))
    with pytest.raises(UnreadableImage): read_radiograph(data[: len(data) // 2], name='cut.dcm')
