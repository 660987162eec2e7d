/// Little-endian fields of on-disk blocks: every Spindle format stores integers this way.
extension Array where Element == UInt8 {
    /// Stores `value` little-endian at byte `offset`.
    mutating func putLittleEndian<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    /// Reads a little-endian integer at byte `offset`.
    func littleEndian<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        withUnsafeBytes { $0.littleEndian(T.self, at: offset) }
    }
}

extension UnsafeRawBufferPointer {
    /// Reads a little-endian integer at byte `offset`.
    func littleEndian<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
