/// The release, printed by `payop-ipnd --version`; scripts/build-deb.sh reads it from this file.
public enum PayopIPNDVersion {
    public static let current = "0.9.0"
}
