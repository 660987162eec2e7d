/// A 128-bit random identifier, printed as 8-4-4-4-12 hex digits.
public struct SpindleUUID: Hashable, Sendable, Codable, CustomStringConvertible {
    public let high: UInt64
    public let low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// A new random identifier.
    public static func random() -> SpindleUUID {
        var generator = SystemRandomNumberGenerator()
        return SpindleUUID(high: generator.next(), low: generator.next())
    }

    public static let zero = SpindleUUID(high: 0, low: 0)

    public var description: String {
        func hex(_ value: UInt64, _ digits: Int) -> String {
            let text = String(value, radix: 16)
            return String(repeating: "0", count: max(0, digits - text.count)) + text
        }
        let text = hex(high, 16) + hex(low, 16)
        let characters = Array(text)
        return [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { String(characters[$0]) }.joined(separator: "-")
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self).replacingOccurrences(of: "-", with: "")
        guard text.count == 32, let high = UInt64(text.prefix(16), radix: 16),
            let low = UInt64(text.suffix(16), radix: 16)
        else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a UUID"))
        }
        self.init(high: high, low: low)
    }
}

extension SpindleUUID {
    /// Nil for the zero UUID (no member).
    var nonZero: SpindleUUID? { self == .zero ? nil : self }
}
