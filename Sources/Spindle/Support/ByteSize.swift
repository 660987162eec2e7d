/// Byte counts written the way people type them: `4096`, `4K`, `64KiB`, `1.5G`, `2T`. Suffixes are
/// powers of two (K = 1024), case does not matter, and a trailing `B` or `iB` is allowed.
package enum ByteSize {
    private static let units: [(suffix: Character, shift: UInt64)] = [
        ("k", 10), ("m", 20), ("g", 30), ("t", 40), ("p", 50),
    ]

    /// Parses a size.
    /// - Throws: ``SpindleError/Code/invalidArgument`` with the text and what to type instead.
    package static func parse(_ text: String) throws(SpindleError) -> UInt64 {
        let trimmed = text.trimmingSpaces()
        var body = Substring(trimmed.lowercased())
        if body.hasSuffix("ib") { body = body.dropLast(2) } else if body.hasSuffix("b") { body = body.dropLast() }
        var shift: UInt64 = 0
        if let last = body.last, let unit = units.first(where: { $0.suffix == last }) {
            shift = unit.shift
            body = body.dropLast()
        } else if trimmed.lowercased().hasSuffix("ib") {
            throw invalid(text)
        }
        guard !body.isEmpty, body.allSatisfy({ $0.isNumber || $0 == "." }), body.filter({ $0 == "." }).count <= 1,
            body.first != ".", body.last != "."
        else {
            throw invalid(text)
        }
        let parts = body.split(separator: ".", omittingEmptySubsequences: false)
        guard let whole = UInt64(parts[0]) else { throw invalid(text) }
        guard whole <= (UInt64.max >> shift) else { throw tooLarge(text) }
        var value = whole << shift
        if parts.count == 2 {
            // An exact fraction of the unit: "1.5G" is fine, "1.3K" (1331.2 bytes) is not.
            let digits = parts[1]
            guard digits.count <= 18, let numerator = UInt64(digits) else { throw invalid(text) }
            var denominator: UInt64 = 1
            for _ in 0..<digits.count { denominator *= 10 }
            let (scaled, overflow) = numerator.multipliedReportingOverflow(by: UInt64(1) << shift)
            guard !overflow, scaled % denominator == 0 else {
                throw SpindleError(
                    .invalidArgument, "'\(text)' is not a whole number of bytes; write it in a smaller unit")
            }
            let (sum, sumOverflow) = value.addingReportingOverflow(scaled / denominator)
            guard !sumOverflow else { throw tooLarge(text) }
            value = sum
        }
        return value
    }

    /// Formats a size with a binary unit: `512 B`, `4 KiB`, `1.5 GiB`.
    package static func format(_ bytes: UInt64) -> String {
        let names = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var index = 0
        var value = Double(bytes)
        while value >= 1024 && index < names.count - 1 {
            value /= 1024
            index += 1
        }
        if index == 0 { return "\(bytes) B" }
        let rounded = (value * 100).rounded() / 100
        if rounded == rounded.rounded() { return "\(Int(rounded)) \(names[index])" }
        return "\(formatDecimal(rounded, places: 2)) \(names[index])"
    }

    private static func invalid(_ text: String) -> SpindleError {
        SpindleError(
            .invalidArgument,
            "'\(text)' is not a size; write a number of bytes with an optional K, M, G or T suffix, such as 4K or 10G")
    }

    private static func tooLarge(_ text: String) -> SpindleError {
        SpindleError(.invalidArgument, "'\(text)' is too large")
    }
}

/// A decimal with a fixed number of places, without Foundation's formatters.
package func formatDecimal(_ value: Double, places: Int) -> String {
    guard value.isFinite else { return value.isNaN ? "nan" : (value > 0 ? "inf" : "-inf") }
    var scale = 1.0
    for _ in 0..<places { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    let whole = UInt64(scaled / scale)
    let fraction = UInt64(scaled - Double(whole) * scale)
    let sign = value < 0 && scaled != 0 ? "-" : ""
    guard places > 0 else { return "\(sign)\(whole)" }
    var digits = String(fraction)
    while digits.count < places { digits = "0" + digits }
    var text = "\(sign)\(whole).\(digits)"
    while text.hasSuffix("0") { text.removeLast() }
    if text.hasSuffix(".") { text.removeLast() }
    return text
}

extension String {
    func trimmingSpaces() -> String {
        String(drop(while: { $0 == " " }).reversed().drop(while: { $0 == " " }).reversed())
    }
}
