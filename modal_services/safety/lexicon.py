"""The words the prompt screen matches, one block per language.

Each list is a string of terms separated by ";". A term may be a phrase (words separated by spaces), and
`stem{a,b,c}` stands for each ending (`niñ{a,o,as,os}`; an empty ending keeps the stem: `menor{,es}`). English
words also match with a plural `s`. A term marked `~` has another meaning in other languages ("nu" is naked in
French and a music genre in English): it pairs only with a term of its own language.

Kinds:
- minor: a word for a minor. sexual: nudity, sex acts, genitals, sexualised clothing.
- minor_sexual: means the pairing by itself.
- adult / clothing: in a negative prompt, steering away from adulthood (on a sexual prompt) or from being dressed
  (on a prompt about a minor) asks for the missing half of the pairing.
- content: in a negative prompt, "adult content", "mature themes": steering away from sexual content, not adulthood.
- benign: phrases holding a minor or sexual word that mean neither ("baby blue", "cum laude"); removed before matching.
- numbers: number words up to 17, for stated ages ("twelve year old", "doce años").
"""

from __future__ import annotations


def terms(text: str) -> list[str]:
    """The terms of one list, as written (braces and `~` unexpanded)."""
    return [term.strip() for term in text.split(";") if term.strip()]


LEXICON: dict[str, dict[str, str]] = {
    "en": {
        "minor": "child; children; childs; kid; kiddie; kiddo; kiddies; minor; underage; underaged; under-age; "
                 "under 18; under eighteen; below 18; preteen; pre-teen; tween; teen; teenage; teenager; toddler; "
                 "infant; newborn; baby; babies; loli; lolita; shota; schoolgirl; schoolboy; prepubescent; "
                 "pubescent; juvenile; youngster; little girl; little boy; young girl; young boy; small girl; "
                 "small boy; girl child; boy child; elementary school; primary school; middle school; grade school; "
                 "junior high; high schooler; high school girl; high school boy; high school student; middle schooler; "
                 "elementary schooler; grade schooler; kindergarten; kindergartner; kindergartener; preschool; "
                 "preschooler; jailbait; barely legal; young teen; in high school",
        "sexual": "nsfw; nude; nudity; naked; sex; sexual; sexy; sexualized; sexualised; porn; porno; pornographic; "
                  "pornography; hentai; erotic; erotica; lewd; xxx; r18; r-18; x-rated; nipple; areola; areolae; "
                  "pussy; vagina; vulva; labia; clitoris; penis; cock; dick; testicles; genital; genitals; genitalia; "
                  "breasts; boobs; tits; titties; cleavage; topless; bottomless; undressed; undressing; striptease; "
                  "stripping; lingerie; underwear; panties; thong; orgasm; masturbate; masturbating; masturbation; "
                  "fellatio; blowjob; cunnilingus; cum; semen; ejaculation; intercourse; rape; raped; molest; "
                  "molested; seductive; seduce; seducing; bdsm; bondage; fetish; ahegao; spread legs; no clothes; "
                  "without clothes; pantyshot; upskirt; orgy; explicit; explicit sex; adult content; mature content; "
                  "nudes; noods; nood; nudez; sexx; fuck; fucking; anal",
        "minor_sexual": "lolicon; shotacon; pedo; pedophile; pedophilia; paedo; paedophile; paedophilia; csam; "
                        "child porn; kiddie porn; kid porn; cp porn; underage sex",
        "adult": "adult; adults; adulthood; mature; mature body; adult body; adult woman; adult man; adult female; "
                 "adult male; mature female; mature male; mature woman; mature features; grown up; grownup; "
                 "aged up; aged-up; adult proportions",
        "clothing": "clothes; clothed; clothing; fully clothed; dressed; fully dressed; sfw; safe for work; censored",
        "content": "content; contents; theme; themes; rating; rated; material; nsfw; nudity; nude; sexual; "
                   "explicit; lewd",
        "benign": "baby blue; baby pink; baby face; babyface; baby doll; babydoll; baby oil; baby bump; "
                  "baby shower; baby's breath; babys breath; sugar baby; cum laude; magna cum laude; "
                  "summa cum laude; moby dick; kid gloves; teenage mutant ninja turtles; teen titans; minor key; "
                  "minor league; minor leagues; chicken breast; turkey breast; dick grayson; philip k dick",
        "numbers": "one 1; two 2; three 3; four 4; five 5; six 6; seven 7; eight 8; nine 9; ten 10; eleven 11; "
                   "twelve 12; thirteen 13; fourteen 14; fifteen 15; sixteen 16; seventeen 17",
    },
    "es": {
        "minor": "niñ{a,o,as,os}; ~nin{a,o,as,os}; nen{a,as}; chiquill{a,o,as,os}; menor de edad; menores de edad; "
                 "menor{,es}; adolescente{,s}; preadolescente{,s}; colegial{a,as}; bebé{,s}; infantil; "
                 "estudiante de primaria; niñit{a,o}; chavalit{a,o}",
        "sexual": "desnud{a,o,as,os}; sexo; sexual; porno; pornografía; erótic{a,o}; tetas; pezones; coño; pene; "
                  "lencería; ropa interior; bragas; tanga; sin ropa; follando; violación; sensual; provocativa; "
                  "masturbándose",
        "minor_sexual": "pornografía infantil; pedofilia",
        "adult": "adult{a,o}; madur{a,o}; mujer adulta",
        "clothing": "ropa; vestid{a,o}",
        "content": "contenido",
        "benign": "azul bebé; rosa bebé; cara de bebé",
        "numbers": "uno 1; dos 2; tres 3; cuatro 4; cinco 5; seis 6; siete 7; ocho 8; nueve 9; diez 10; once 11; "
                   "doce 12; trece 13; catorce 14; quince 15; dieciséis 16; diecisiete 17",
    },
    "pt": {
        "minor": "crianç{a,as}; menin{a,o,as,os}; garotinh{a,o,as,os}; menor de idade; menor{,es}; "
                 "adolescente{,s}; novinh{a,as}; colegial; bebê{,s}; infantil; aluna do ensino fundamental; "
                 "ensino fundamental",
        "sexual": "nu{a,as,s}; ~nu; pelad{a,o,as,os}; sexo; pornô; porno; pornografia; erótic{a,o}; seios; "
                  "mamilos; buceta; pênis; calcinha; sem roupa; transando; estupro; sensual",
        "minor_sexual": "pornografia infantil; pedofilia",
        "adult": "adult{a,o}; madur{a,o}; mulher madura",
        "clothing": "roupa{,s}; vestid{a,o}",
        "content": "conteúdo",
        "benign": "azul bebê; rosa bebê; cara de bebê",
        "numbers": "um 1; dois 2; três 3; quatro 4; cinco 5; seis 6; sete 7; oito 8; nove 9; dez 10; onze 11; "
                   "doze 12; treze 13; catorze 14; quatorze 14; quinze 15; dezesseis 16; dezasseis 16; "
                   "dezessete 17; dezassete 17",
    },
    "fr": {
        "minor": "enfant{,s}; fillette{,s}; petite fille; petit garçon; gamin{,e,s,es}; ~mineur{,e,s,es}; "
                 "adolescent{,e,s,es}; ~ado{,s}; écolière{,s}; collégien{,ne,s,nes}; bébé{,s}; élève de primaire",
        "sexual": "nu{e,s,es}; ~nu; sexe; sexuel{,le}; porno; érotique; seins; seins nus; tétons; chatte; pénis; "
                  "culotte; string; déshabillé{,e}; dénudé{,e}; masturbation; viol",
        "minor_sexual": "pédopornographie; pédophilie",
        "adult": "adulte{,s}; mature",
        "clothing": "vêtements; habillé{,e}",
        "content": "contenu",
        "benign": "bleu bébé; rose bébé; visage de bébé",
        "numbers": "un 1; deux 2; trois 3; quatre 4; cinq 5; six 6; sept 7; huit 8; neuf 9; dix 10; onze 11; "
                   "douze 12; treize 13; quatorze 14; quinze 15; seize 16; dix-sept 17; dix sept 17",
    },
    "de": {
        "minor": "~kind{,er,es}; kleines mädchen; kleine mädchen; kleiner junge; kleine jungen; junges mädchen; "
                 "knabe{,n}; jugendliche{,r,n}; teenager; minderjährig{,e,er,en}; schulmädchen; "
                 "schülerin{,nen}; grundschülerin{,nen}; grundschüler; kleinkind{,er}",
        "sexual": "nackt{,e,en,er,es}; sex; sexuell; porno; erotisch{,e}; brüste; nippel; brustwarzen; muschi; "
                  "penis; schwanz; unterwäsche; dessous; höschen; entblößt; vergewaltigung; oben ohne; nacktbild; "
                  "nacktfoto",
        "minor_sexual": "kinderporno; kinderpornografie; kindersex; kinderpornos",
        "adult": "erwachsen{,e}; erwachsene frau; reif{,e}",
        "clothing": "kleidung; angezogen; bekleidet",
        "content": "inhalt{,e}",
        "numbers": "ein 1; eins 1; zwei 2; drei 3; vier 4; fünf 5; sechs 6; sieben 7; acht 8; neun 9; zehn 10; "
                   "elf 11; zwölf 12; dreizehn 13; vierzehn 14; fünfzehn 15; sechzehn 16; siebzehn 17",
    },
    "ru": {
        "minor": "ребенок; ребёнок; ребенка; дети; детей; детск{ий,ая,ое,ие}; девочк{а,и,у,ой}; "
                 "мальчик{,а,и,ов}; школьниц{а,ы,у}; школьник{,и,а}; подрост{ок,ки,ка}; малолетк{а,и,у}; "
                 "малолетн{яя,ий,ие}; несовершеннолетн{яя,ий,ие,юю}; младен{ец,цы}; лоли; лолита; devochka",
        "sexual": "гол{ая,ый,ые,ую,ой,ых}; обнаж{енная,ённая,енный,ённый,енные,ённые}; секс; порно; эротика; "
                  "эротическ{ий,ая,ое}; соски; вагина; пенис; нижн{ее,ем} бель{е,ё}; нижнем белье; трусик{и,ах}; "
                  "раздет{ая,ый,ые}; мастурбация; изнасилование; хентай; golaya",
        "adult": "взросл{ая,ый}; зрел{ая,ый}",
        "clothing": "одежда; одет{ая,ый}",
        "content": "контент",
        "numbers": "один 1; два 2; три 3; четыре 4; пять 5; шесть 6; семь 7; восемь 8; девять 9; десять 10; "
                   "одиннадцать 11; двенадцать 12; тринадцать 13; четырнадцать 14; пятнадцать 15; "
                   "шестнадцать 16; семнадцать 17; пяти 5; шести 6; семи 7; восьми 8; девяти 9; десяти 10; "
                   "одиннадцати 11; двенадцати 12; тринадцати 13; четырнадцати 14; пятнадцати 15; шестнадцати 16; "
                   "семнадцати 17",
    },
    # "bimbo" (a little boy) is left out: in English prompts it names an adult.
    "it": {
        "minor": "bambin{a,o,e,i}; ragazzin{a,o,e,i}; minorenn{e,i}; adolescent{e,i}; scolarett{a,e}; "
                 "neonat{a,o}; ~bimb{a,e,i}; dodicenne; tredicenne; quattordicenne; quindicenne; sedicenne; "
                 "diciassettenne; undicenne; decenne",
        "sexual": "nud{a,o,e,i}; sesso; sessuale; porno; erotic{a,o}; seno nudo; tette; capezzoli; figa; pene; "
                  "mutandine; biancheria intima; spogliat{a,o}; masturbazione; stupro",
        "minor_sexual": "pedopornografia; pedofilia",
        "adult": "adult{a,o}; matur{a,o}",
        "clothing": "vestiti; vestit{a,o}",
        "content": "contenuti; contenuto",
        "numbers": "uno 1; due 2; tre 3; quattro 4; cinque 5; sei 6; sette 7; otto 8; nove 9; dieci 10; "
                   "undici 11; dodici 12; tredici 13; quattordici 14; quindici 15; sedici 16; diciassette 17",
    },
    "pl": {
        "minor": "dzieck{o,a}; dzieci; dziecięc{a,e,y}; dziewczyn{ka,ki,kę,ek}; chłop{iec,ca,cy}; "
                 "nastolat{ka,ki,ek}; nieletni{,a,e}; uczennic{a,e}; małolat{a,y}; niemowl{ę,ęta}",
        "sexual": "~nag{a,i,ie,ą}; nago; seks; porno; erotyczn{a,e,y}; erotyka; piersi; sutki; cipka; bieliźnie; "
                  "bielizna; majtk{i,ach}; rozebran{a,y,e}; masturbacja; gwałt; seksown{a,e,y}",
        "minor_sexual": "pornografia dziecięca; pedofilia",
        "adult": "dorosł{a,y}; dojrzał{a,y}",
        "clothing": "ubranie; ubran{a,y}",
        "content": "treści",
        "numbers": "jeden 1; dwa 2; trzy 3; cztery 4; pięć 5; sześć 6; siedem 7; osiem 8; dziewięć 9; "
                   "dziesięć 10; jedenaście 11; dwanaście 12; trzynaście 13; czternaście 14; piętnaście 15; "
                   "szesnaście 16; siedemnaście 17; pięcio 5; sześcio 6; siedmio 7; ośmio 8; dziewięcio 9; "
                   "dziesięcio 10; jedenasto 11; dwunasto 12; trzynasto 13; czternasto 14; piętnasto 15; "
                   "szesnasto 16; siedemnasto 17",
    },
    "tr": {
        "minor": "çocu{k,ğu,klar,kları,kların}; küçük kız; kız çocuğu; erkek çocuk; reşit olmayan; ergen; "
                 "liseli; ortaokul; ortaokul öğrencisi; ilkokul öğrencisi; ~bebek",
        "sexual": "çıplak; seks; seksi; porno; pornosu; erotik; göğüs; ~meme{,ler}; iç çamaşırı; külot; soyunmuş; "
                  "mastürbasyon; tecavüz",
        "adult": "yetişkin; olgun",
        "clothing": "kıyafet; giyinik",
        "content": "içerik",
        "benign": "bebek arabası; bebek mavisi",
        "numbers": "bir 1; iki 2; üç 3; dört 4; beş 5; altı 6; yedi 7; sekiz 8; dokuz 9; on 10; on bir 11; "
                   "on iki 12; on üç 13; on dört 14; on beş 15; on altı 16; on yedi 17",
    },
    "ja": {
        "minor": "子供; 子ども; こども; 児童; 幼女; 幼児; 少女; 少年; 女児; 男児; 小学生; 中学生; 女子中学生; "
                 "女子小学生; 未成年; 幼い; ロリ; ロリータ; ショタ; 女子高生; loli; rori; shoujo; youjo; "
                 "joshi shougakusei; shougakusei; chuugakusei; ~jc; ~js",
        "sexual": "裸; 全裸; 半裸; 裸体; ヌード; エロ; エッチ; セックス; 性交; おっぱい; 乳首; 下着; パンツ; 巨乳; "
                  "ちんこ; まんこ; 陰部; 性器; ero; ecchi; hadaka; zenra; oppai; nude",
        "minor_sexual": "児童ポルノ; ロリコン; ショタコン",
        "adult": "大人; 成人",
        "clothing": "服; 着衣",
        "content": "コンテンツ",
        "benign": "裸足; 裸眼; 赤裸々",
        "numbers": "一 1; 二 2; 三 3; 四 4; 五 5; 六 6; 七 7; 八 8; 九 9; 十 10; 十一 11; 十二 12; 十三 13; "
                   "十四 14; 十五 15; 十六 16; 十七 17",
    },
    "zh": {
        "minor": "儿童; 兒童; 小孩; 孩子; 小女孩; 小男孩; 幼女; 幼童; 萝莉; 蘿莉; 正太; 未成年; 女童; 男童; 小学生; "
                 "初中生; 初中女生; 中学生; 婴儿; 少女",
        "sexual": "裸体; 裸體; 裸照; 裸露; 色情; 性爱; 做爱; 乳头; 阴道; 阴茎; 内衣; 內衣; 性感",
        "minor_sexual": "儿童色情; 兒童色情; 恋童",
        "adult": "成年; 成年人",
        "clothing": "衣服",
        "content": "内容",
        "benign": "女孩子; 男孩子",
        "numbers": "两 2",
    },
    "ko": {
        "minor": "아이; 어린이; 아동; 소녀; 소년; 미성년자; 미성년; 초등학생; 중학생; 여중생; 여고생; 유아; 아기; "
                 "로리; 쇼타; 어린 소녀; 어린",
        "sexual": "나체; 알몸; 벗은; 누드; 섹스; 성행위; 야한; 음란; 포르노; 젖꼭지; 보지; 자지; 속옷; 팬티; 자위; "
                  "강간; 야동; 에로",
        "minor_sexual": "아동 포르노; 아동포르노",
        "adult": "성인; 어른",
        "clothing": "옷",
        "content": "콘텐츠",
        "numbers": "한 1; 두 2; 세 3; 네 4; 다섯 5; 여섯 6; 일곱 7; 여덟 8; 아홉 9; 열 10; 열한 11; 열두 12; "
                   "열세 13; 열네 14; 열다섯 15; 열여섯 16; 열일곱 17",
    },
}

# Units after a number that make it an age ("12yo", "12 años", "12歳"), and words before one ("aged 12", "age: 12").
AGE_UNITS = ("yo; y/o; y.o.; y.o; yr; yrs; yr old; yrs old; year old; years old; year-old; years-old; yearold; "
             "years of age; year of age; años; anos; ans; jahre; jahren; jahre alt; jährig; jährige; jährigen; "
             "jähriges; jähriger; anni; lat; latek; latka; letnia; letni; letnie; лет; года; год; летняя; летний; "
             "летнюю; yaşında; yaş; yaşındaki; 歳; 才; さい; 岁; 歲; 살; 세")
AGE_PREFIXES = "aged; age; age:; age=; edad; idade; âge; alter; età; возраст; wiek; yaş; girl of; boy of; who is"
# School grades: a number before ("5th grade") or after ("grade 5"); any grade is a minor.
GRADE_WORDS = "grade; grader; graders; klasse; класс; класса; sınıf; sınıfı; grado; klasa; klasy; 年生"
ORDINALS = "first; second; third; fourth; fifth; sixth; seventh; eighth; ninth; tenth; eleventh; twelfth"

# Words that glue a minor word and a sexual word into one token ("nakedlittlegirl", "lolinsfw"), and particles
# written onto Korean words ("아이들이": 아이 + 들 + 이).
GLUE = ("a; an; the; and; n; my; little; young; tiny; small; cute; hot; girl; girls; boy; boys; pic; pics; photo; "
        "photos; vid; vids; video; 들; 이; 가; 은; 는; 을; 를; 의; 와; 과; 도; 로; 으로; 에; 에서; 랑; 이랑; 한테; 에게")
# Words that may stand beside a clothing word in a negative prompt and still mean "not dressed" ("fully clothed").
CLOTHING_MODIFIERS = "fully; any; all; wearing; with; full; completely; totalmente; totalement; komplett; полностью"
