/// Identifiers that sort by creation time: a prefix, 48 bits of milliseconds and 80 random bits in
/// Crockford base32 (the ULID layout), so `ORDER BY id` is also time order and ids never collide.
public enum SortableID {
    private static let alphabet = Array("0123456789ABCDEFGHJKMNPQRSTVWXYZ".utf8)

    public static func make(prefix: String, millisecondsSince1970 ms: Int64) -> String {
        var generator = SystemRandomNumberGenerator()
        var chars = [UInt8](repeating: 0, count: 26)
        var time = UInt64(max(0, ms))
        for index in stride(from: 9, through: 0, by: -1) {
            chars[index] = alphabet[Int(time & 31)]
            time >>= 5
        }
        // 16 digits of 5 bits: 12 from one random word (60 bits), 4 from another (20 bits).
        var first = generator.next()
        var second = generator.next()
        for index in 10..<22 {
            chars[index] = alphabet[Int(first & 31)]
            first >>= 5
        }
        for index in 22..<26 {
            chars[index] = alphabet[Int(second & 31)]
            second >>= 5
        }
        return prefix + String(decoding: chars, as: UTF8.self)
    }
}
